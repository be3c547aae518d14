"""Argument groups and choices shared by the `grata` verbs (defined once here)."""

from __future__ import annotations

import argparse
from pathlib import Path

from grata import defaults, product
from grata.sizes import check_size


def csv_list(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c'] (an argparse type)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--checkpoint, --arch, --size: the source model (default: the shipped one)."""
    p.add_argument("--checkpoint", type=Path, help="source checkpoint (default: the shipped "
                   "edge model, which implies --arch edge)")
    p.add_argument("--arch", help="resnet18, resnet34 or edge (default: edge for the shipped "
                   "checkpoint, else resnet34)")
    p.add_argument("--size", type=int, help="input size S, a multiple of 32, at least 64 "
                   "(default 128 for the shipped model, else 512)")


def model_choice(args) -> tuple[Path, str, int]:
    """(checkpoint, arch, size) from `add_model_args`' flags and the embedded default."""
    embedded = args.checkpoint is None
    checkpoint = defaults.checkpoint() if embedded else args.checkpoint
    arch = args.arch or (defaults.DEFAULT_ARCH if embedded else "resnet34")
    size = check_size(args.size or (defaults.DEFAULT_SIZE if embedded else 512))
    return checkpoint, arch, size


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")


def add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the strong augmentation")


def add_quiet(p: argparse.ArgumentParser, what: str = "no progress bars") -> None:
    p.add_argument("--quiet", action="store_true", help=what)


def add_paper(p: argparse.ArgumentParser) -> None:
    p.add_argument("--paper", action="store_true",
                   help="the paper's setting instead of the product's defaults: each "
                   "image's own BN statistics (--norm sample) and the authors' step sizes "
                   "(GraTa beta, TENT lr 1e-4); see README, 'Defaults'")


def product_choice(args) -> tuple:
    """(statistics rule, hyperparameter base) of a run: the product's measured defaults
    (`grata.product`) or, with --paper, the paper's (per-image statistics, the methods'
    own constructor defaults). An explicit --norm wins either way."""
    norm = args.norm if args.norm is not None else ("sample" if args.paper
                                                     else product.PRODUCT_NORM)
    return norm, ({} if args.paper else product.PRODUCT_HP)


def add_hyperparameters(p: argparse.ArgumentParser) -> None:
    """--hp METHOD.NAME=VALUE (repeatable) and --config FILE.toml."""
    p.add_argument("--hp", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="a method's hyperparameter, e.g. grata.beta=1e-3, tent.lr=2e-4, "
                   "grata.betas=0.9,0.999 (repeatable; checked against the method)")
    p.add_argument("--config", type=Path, metavar="FILE.toml",
                   help="hyperparameters as TOML tables per method ([grata] beta = 1e-3); "
                   "--hp wins over it")


def add_alias(p: argparse.ArgumentParser, old: str, dest: str, **kw) -> None:
    """An earlier spelling of a flag, still accepted, not shown in --help."""
    p.add_argument(old, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kw)


def data_root(data: Path | None, progress: bool) -> Path:
    """--data, or the synthetic benchmark (generated on first use)."""
    if data is not None:
        return data
    return defaults.synthetic_root(progress=progress)

"""Artifact folders exported once into the cache, keyed by what they were made from."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from grata import defaults
from grata.digest import file_sha256
from grata.disc_scale import read_sidecar, sidecar_path
from grata.errors import GrataError
from grata.export import DEVICE_TEACHER_VIEWS, EXPORT_REVISION, export_artifacts


def _export_once(folder: Path, export, message: str, quiet: bool) -> Path:
    """Run `export(tmp)` into a temp folder beside `folder` and rename it into place,
    unless `folder` already holds a manifest; concurrent exports keep the first."""
    if (folder / "manifest.json").exists():
        return folder
    if not quiet:
        print(message, file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    export(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # exported concurrently: keep the first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _export_fn():
    """export_artifacts with the device's teacher layout (`DEVICE_TEACHER_VIEWS`)."""
    try:
        import torch  # noqa: F401  (exporting needs the reference)
    except ImportError:
        raise GrataError("exporting a model needs torch: pip install 'grata-edge[export]', "
                         "or pass --artifacts DIR") from None

    def export(model, arch, size, out, disc_scale=None):
        return export_artifacts(model, arch, size, out, teacher_views=DEVICE_TEACHER_VIEWS,
                                disc_scale=disc_scale)
    return export


def _layout() -> str:
    """The exporter's revision and the graph layout in a cache key (teacher views per
    pass), so folders exported by an earlier version or with another layout are not
    reused."""
    return _key_tail(DEVICE_TEACHER_VIEWS)


def _key_tail(views: int) -> str:
    return f"x{EXPORT_REVISION}-tv{views}"


def cached_artifacts(checkpoint, arch: str, size: int, quiet: bool = True) -> Path:
    """Artifacts of a checkpoint, exported once into the cache (keyed by its SHA-256,
    the arch, the size, its disc scale sidecar's SHA-256 when it has one and the teacher
    layout); the sidecar's scale (`grata.disc_scale`) goes into the manifest."""
    if not Path(checkpoint).is_file():
        raise GrataError(f"{checkpoint}: checkpoint not found")
    scale = read_sidecar(checkpoint)
    tag = f"s{file_sha256(sidecar_path(checkpoint))[:8]}-" if scale is not None else ""
    key = f"{file_sha256(checkpoint)[:16]}-{arch}-{size}-{tag}{_layout()}"
    folder = defaults.cache_dir() / "artifacts" / key
    if (folder / "manifest.json").exists():
        return folder
    export = _export_fn()
    return _export_once(folder, lambda tmp: export(checkpoint, arch, size, tmp, scale),
                        f"exporting {checkpoint} ({arch}, {size}x{size}) to {folder} (once)",
                        quiet)


def random_model_artifacts(arch: str, size: int, seed: int, quiet: bool = True,
                           teacher_views: int | None = None) -> Path:
    """Artifacts of a randomly initialised ResUnet (torch.manual_seed(seed)), exported
    once into the cache: timings do not depend on the weights. `teacher_views`: the
    consistency graphs' teacher views per pass (default: the device's)."""
    views = DEVICE_TEACHER_VIEWS if teacher_views is None else teacher_views
    folder = defaults.cache_dir() / "bench" / f"{arch}-{size}-seed{seed}-{_key_tail(views)}"
    if (folder / "manifest.json").exists():
        return folder
    _export_fn()  # torch and the exporter are there, or a one-line error

    def make(tmp):
        import torch

        from grata.models import ResUnet
        torch.manual_seed(seed)
        export_artifacts(ResUnet(arch), arch, size, tmp, teacher_views=views)
    return _export_once(folder, make, f"exporting a random {arch} at {size}x{size} to "
                        f"{folder} (once)", quiet)


def default_artifacts(size: int | None = None, quiet: bool = True) -> tuple[Path, str]:
    """The embedded default's artifacts: the shipped checkpoint exported at `size` (the
    default size), or a random edge model when the checkpoint is not there; and a word
    on which."""
    size = size or defaults.DEFAULT_SIZE
    ckpt = defaults.checkpoint()
    if Path(ckpt).is_file():
        return cached_artifacts(ckpt, defaults.DEFAULT_ARCH, size, quiet), \
            f"shipped checkpoint {Path(ckpt).name}"
    return random_model_artifacts(defaults.DEFAULT_ARCH, size, 0, quiet), \
        "random weights (seed 0; the shipped checkpoint is absent)"

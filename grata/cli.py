"""The `grata` command line. Every subcommand is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from . import __version__, defaults
from .errors import GrataError

EPILOG_ADAPT = """\
examples:
  grata adapt --out runs/demo
      the embedded default: a synthetic multi-centre benchmark (made on first use),
      the shipped edge model, methods source,bn,tent,grata; a few minutes on 2 cores
  grata adapt --data /data/fundus --source REFUGE --targets ORIGA,Drishti_GS \\
      --checkpoint refuge_resnet34.pt --arch resnet34 --size 512 --out runs/refuge
      real data in the GraTa CSV layout (or the DoFE folder layout)

outputs: DIR/report.json (per method and target: Dice OD/OC/mean, vCDR error,
surface distance, skipped files with reasons, per-image rows); --overlays writes
DIR/overlays/<method>/<target>/*.png, --plot writes DIR/dice_stream.png.
"""


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, help="source checkpoint (default: the shipped "
                   "edge model, which implies --arch edge)")
    p.add_argument("--arch", help="resnet18, resnet34 or edge (default: edge for the shipped "
                   "checkpoint, else resnet34)")
    p.add_argument("--size", type=int, help="input size S, a multiple of 32 (default 128 for "
                   "the shipped model, else 512)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grata", description="Test-time adaptation (GraTa) of optic disc/cup "
        "segmentation on the device. Run 'grata COMMAND --help' for each command.")
    p.add_argument("--version", action="version", version=f"grata-edge {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("synth", help="write the synthetic multi-centre fundus benchmark",
                       description="Write a deterministic synthetic fundus benchmark in the "
                       "GraTa CSV layout: one source domain and several target domains "
                       "with camera/centre shifts. The same seed gives identical files.")
    s.add_argument("--out", required=True, type=Path, help="folder to write (created)")
    s.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")

    t = sub.add_parser("train-source", help="train a source model on one domain",
                       description="Train a ResUnet on the train split of one domain "
                       "(SGD Nesterov, momentum 0.99, poly decay, Dice + BCE). "
                       "Interrupted runs resume from OUT.state.pt.")
    t.add_argument("--data", type=Path, help="data root (default: the synthetic benchmark)")
    t.add_argument("--domain", help="source domain (default: the synthetic source)")
    t.add_argument("--arch", default=defaults.DEFAULT_ARCH,
                   help="resnet18, resnet34 or edge (default edge)")
    t.add_argument("--size", type=int, default=defaults.DEFAULT_SIZE,
                   help="input size S, divisible by 32 (default 128)")
    t.add_argument("--epochs", type=int, default=60, help="epochs (default 60)")
    t.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    t.add_argument("--lr", type=float, default=1e-3, help="initial learning rate (1e-3)")
    t.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    t.add_argument("--threads", type=int, help="CPU threads (default: all cores; 1 gives "
                   "results that do not depend on the machine's core count)")
    t.add_argument("--no-resume", action="store_true", help="start over even if a state exists")
    t.add_argument("--out", required=True, type=Path, help="checkpoint to write (.pt)")

    e = sub.add_parser("export", help="export ONNX training artifacts for the device runtime",
                       description="Write the artifact folder the onnx runtime adapts with: "
                       "infer, entropy_grad and consistency_grad graphs (standard ONNX, theta "
                       "= every BN gamma/beta as one flat input), shared weights, theta0 and "
                       "manifest.json with SHA-256 of every file.")
    _model_args(e)
    e.add_argument("--out", required=True, type=Path, help="artifact folder (replaced)")

    a = sub.add_parser("adapt", help="adapt on target domains and score every image",
                       description="Stream each target domain image by image through each\n"
                       "method (batch 1, one step per image, prediction after the step) and\n"
                       "report Dice of optic disc (OD) and cup (OC) per domain.",
                       epilog=EPILOG_ADAPT, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--data", type=Path, help="data root (default: the synthetic benchmark, "
                   "generated on first use)")
    a.add_argument("--source", help="the source domain (excluded from the default targets)")
    a.add_argument("--targets", type=_csv, help="comma-separated target domains "
                   "(default: every domain but the source)")
    _model_args(a)
    a.add_argument("--methods", type=_csv, default=["source", "bn", "tent", "grata"],
                   help="comma-separated: source, bn, tent, grata, grata-noalign, "
                   "grata-fixedlr (default source,bn,tent,grata)")
    a.add_argument("--protocol", default="domain", choices=["domain", "episodic", "continual"],
                   help="reset per target domain (default), per image, or never")
    a.add_argument("--backend", default="onnx", choices=["onnx", "torch"],
                   help="onnx: ONNX graphs on onnxruntime, numpy updates, no torch (default); "
                   "torch: the PyTorch reference")
    a.add_argument("--artifacts", type=Path, help="exported artifact folder for --backend onnx "
                   "(default: export the checkpoint on first use into the cache)")
    a.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where to adapt (cuda: torch on the GPU with the fused kernel, or "
                   "onnxruntime's CUDA provider)")
    a.add_argument("--seed", type=int, default=0, help="seed of the strong augmentation")
    a.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    a.add_argument("--overlays", action="store_true", help="write PNG overlays per image")
    a.add_argument("--plot", action="store_true", help="write a Dice-over-stream PNG")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.add_argument("--out", required=True, type=Path, help="output folder")
    for name in EXTRA_COMMANDS:
        COMMANDS.update(importlib.import_module(name).register(sub))
    return p


def cmd_synth(args) -> int:
    from .synth import generate
    summary = generate(args.out, seed=args.seed, progress=True)
    print(f"wrote {args.out}: {summary}")
    return 0


def _model_choice(args) -> tuple[Path, str, int]:
    embedded = args.checkpoint is None
    checkpoint = defaults.checkpoint() if embedded else args.checkpoint
    arch = args.arch or (defaults.DEFAULT_ARCH if embedded else "resnet34")
    size = args.size or (defaults.DEFAULT_SIZE if embedded else 512)
    if size % 32 or size < 32:
        raise GrataError(f"--size must be a positive multiple of 32, not {size}")
    return checkpoint, arch, size


def cmd_export(args) -> int:
    checkpoint, arch, size = _model_choice(args)
    try:
        from .export import export_artifacts
        from .models import load_checkpoint
    except ImportError:
        raise GrataError("export needs torch and onnx: pip install 'grata-edge[export]'") \
            from None
    manifest = export_artifacts(load_checkpoint(checkpoint, arch), arch, size, args.out)
    total = sum((args.out / f).stat().st_size for f in manifest["sha256"])
    print(f"wrote {args.out}: {', '.join(manifest['graphs'])}; theta {manifest['n_theta']} "
          f"values; {total / 1e6:.1f} MB")
    return 0


def _data_root(data: Path | None, progress: bool) -> Path:
    if data is not None:
        return data
    return defaults.synthetic_root(progress=progress)


def cmd_train(args) -> int:
    from .synth import SOURCE_DOMAIN
    from .train import train_source
    root = _data_root(args.data, True)
    domain = args.domain or (SOURCE_DOMAIN if args.data is None else None)
    if domain is None:
        raise GrataError("--domain is required with --data")
    if args.size % 32:
        raise GrataError(f"--size must be divisible by 32, not {args.size}")
    info = train_source(root, domain, args.arch, args.size, args.epochs, args.out,
                        batch=args.batch, lr=args.lr, seed=args.seed,
                        resume=not args.no_resume, threads=args.threads)
    print(f"wrote {info['checkpoint']} ({info['n_images']} images, {info['epochs']} epochs, "
          f"final loss {info['final_loss']:.4f})\nsha256 {info['sha256']}")
    return 0


def cmd_adapt(args) -> int:
    from .adapt import check_names, run
    from .data import resolve_targets
    from .outdir import check_out_dir
    from .report import (
        build_report,
        format_table,
        overlay,
        plot_stream,
        save_png_atomic,
        write_json_atomic,
    )
    check_out_dir(args.out)  # before any work: a finished domain must have somewhere to go
    check_names(args.methods, args.protocol)
    checkpoint, arch, size = _model_choice(args)
    root = _data_root(args.data, not args.quiet)
    source = args.source
    if source is None and args.data is None:
        from .synth import SOURCE_DOMAIN
        source = SOURCE_DOMAIN
    targets = resolve_targets(root, source, args.targets)
    if args.threads and args.backend == "torch":
        import torch
        torch.set_num_threads(args.threads)

    if args.backend == "onnx":
        artifacts = args.artifacts or _cached_artifacts(checkpoint, arch, size, args.quiet)
        engine_factory = _onnx_factory(artifacts, args.device, args.threads)
        probe = engine_factory()  # fail early on bad artifacts, before any work
        if probe.size != size:
            raise GrataError(f"artifacts {artifacts} were exported at size {probe.size}, "
                             f"not {size}; pass --size {probe.size} or export again")
        checkpoint = artifacts
    else:
        if args.artifacts is not None:
            raise GrataError("--artifacts goes with --backend onnx")
        engine_factory = _torch_factory(checkpoint, arch, args.device)
        engine_factory()  # fail early on a bad checkpoint, before any work
    config = {"backend": args.backend, "device": args.device, "data": str(root), "source": source, "targets": targets,
              "checkpoint": str(checkpoint), "arch": arch, "size": size,
              "methods": args.methods, "protocol": args.protocol, "seed": args.seed,
              "grata_version": __version__}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    def on_image(method, target, row, pred, sample):
        if args.overlays:
            stem = Path(sample.name).stem
            save_png_atomic(overlay(sample.image, pred, sample.target),
                            out / "overlays" / method / target / f"{row['index']:04d}_{stem}.png")

    def on_domain(results):
        write_json_atomic(out / "report.json", build_report(results, config, complete=False))

    start = time.perf_counter()
    results = run(engine_factory, root, targets, size, args.methods, args.protocol,
                  args.seed, on_image=on_image, on_domain=on_domain, progress=not args.quiet)
    report = build_report(results, config, complete=True)
    report["elapsed_s"] = time.perf_counter() - start
    write_json_atomic(out / "report.json", report)
    if args.plot:
        plot_stream(report, out / "dice_stream.png")
    print(f"\nDice (%) on {len(targets)} target domain(s), protocol {args.protocol}, "
          f"backend {args.backend}:")
    print(format_table(report))
    print(f"\nreport: {out / 'report.json'}  ({report['elapsed_s']:.0f} s)")
    return 0


def _torch_factory(checkpoint: Path, arch: str, device: str = "cpu"):
    from .models import load_checkpoint
    from .torch_engine import TorchEngine
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise GrataError("--device cuda: this torch sees no CUDA device")

    def make():
        return TorchEngine(load_checkpoint(checkpoint, arch), device=device)
    return make


def _onnx_factory(artifacts: Path, device: str, threads: int | None):
    from .runtime import open_engine

    def make():
        return open_engine(artifacts, device=device, threads=threads)
    return make


def _cached_artifacts(checkpoint: Path, arch: str, size: int, quiet: bool) -> Path:
    """Artifacts of a checkpoint, exported once into the cache (keyed by its SHA-256)."""
    from .export.manifest import file_sha256
    if not Path(checkpoint).is_file():
        raise GrataError(f"{checkpoint}: checkpoint not found")
    key = f"{file_sha256(checkpoint)[:16]}-{arch}-{size}"
    folder = defaults.cache_dir() / "artifacts" / key
    if (folder / "manifest.json").exists():
        return folder
    try:
        import torch  # noqa: F401  (exporting needs the reference)

        from .export import export_artifacts
    except ImportError:
        raise GrataError("exporting the checkpoint needs torch: pip install "
                         "'grata-edge[export]', or pass --artifacts DIR") from None
    if not quiet:
        print(f"exporting {checkpoint} ({arch}, {size}x{size}) to {folder} (once)",
              file=sys.stderr)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    export_artifacts(checkpoint, arch, size, tmp)
    try:
        tmp.rename(folder)
    except OSError:  # exported concurrently: keep the first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


COMMANDS = {"synth": cmd_synth, "train-source": cmd_train, "export": cmd_export,
            "adapt": cmd_adapt}
# Modules that add subcommands: each has register(subparsers) -> {name: handler(args)}.
# They import their heavy dependencies inside the handlers, so --help stays fast.
EXTRA_COMMANDS: tuple[str, ...] = ("grata.serve", "grata.bench", "grata.calibration.cli")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="grata: %(levelname)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except GrataError as exc:
        print(f"grata {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"grata {args.command}: interrupted; finished domains are in the report",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

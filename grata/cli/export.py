"""`grata export`: the ONNX artifact folder the device runtime adapts with."""

from __future__ import annotations

from pathlib import Path

from grata.disc_scale import DIAMETER_HELP, model_scale
from grata.cli.common import add_model_args, model_choice
from grata.errors import GrataError
from grata.export import DEVICE_TEACHER_VIEWS, export_artifacts


def register(subparsers) -> dict:
    e = subparsers.add_parser(
        "export", help="export ONNX training artifacts for the device runtime",
        description="Write the artifact folder the onnx engine adapts with: infer, "
        "entropy_grad and consistency_grad graphs (standard ONNX, theta = every BN "
        "gamma/beta as one flat input), shared weights, theta0 and manifest.json with "
        "SHA-256 of every file.")
    add_model_args(e)
    e.add_argument("--disc-scale", type=float, metavar="D",
                   help=f"{DIAMETER_HELP}. Default: the checkpoint's CHECKPOINT.scale.json "
                   f"(written by grata train-source); without either the manifest has no "
                   f"disc scale and the model runs on images at the scale they come in")
    e.add_argument("--out", required=True, type=Path, help="artifact folder (replaced)")
    return {"export": cmd_export}


def cmd_export(args) -> int:
    checkpoint, arch, size = model_choice(args)
    try:
        from grata.models import load_checkpoint
    except ImportError:
        raise GrataError("export needs torch and onnx: pip install 'grata-edge[export]'") \
            from None
    scale, line = model_scale(None, checkpoint, args.disc_scale)
    manifest = export_artifacts(load_checkpoint(checkpoint, arch), arch, size, args.out,
                                teacher_views=DEVICE_TEACHER_VIEWS, disc_scale=scale)
    total = sum((args.out / f).stat().st_size for f in manifest["sha256"])
    print(f"wrote {args.out}: {', '.join(manifest['graphs'])}; theta {manifest['n_theta']} "
          f"values; {total / 1e6:.1f} MB\n{line}")
    return 0

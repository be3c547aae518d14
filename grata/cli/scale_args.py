"""Crops of any scale on the command line: --scale and --disc-scale."""

from __future__ import annotations

import argparse
import sys

from grata import product
from grata.disc_scale import DIAMETER_HELP, DiscScale, model_scale
from grata.errors import GrataError


def add_scale_args(p: argparse.ArgumentParser) -> None:
    """--scale none|auto and --disc-scale D."""
    p.add_argument("--scale", choices=["none", "auto"], default=None,
                   help="auto (default): per image, the disc is found with the source "
                   "model and the crop re-cropped so the disc has the model's training "
                   "size, the prediction pasted back and scored at the crop's own "
                   "resolution; a crop without a disc found is segmented as given (the "
                   "report says why); with --roi auto, whole photographs: the box around "
                   "the disc found is sized so the disc has the model's size, and a "
                   "photograph the localiser doubts is kept when the model finds a "
                   "plausible disc there. Needs the model's disc scale (its manifest, its "
                   "checkpoint's .scale.json or --disc-scale); without one the crops are "
                   "segmented as given, with one line saying so. none: every crop "
                   "segmented as given, resized to the model's input (the default with "
                   "--paper: the paper's protocol)")
    p.add_argument("--disc-scale", type=float, default=None, metavar="D",
                   help=f"with --scale auto: {DIAMETER_HELP}")


def check_scale_args(args) -> None:
    """The run's --scale (the product's, or none with --paper, where not given) set on
    `args`; --disc-scale with --scale none is a mistake (one line)."""
    if args.scale is None:
        args.scale = "none" if getattr(args, "paper", False) else product.PRODUCT_SCALE
    if args.scale == "none" and args.disc_scale is not None:
        raise GrataError("--disc-scale goes with --scale auto")


def scale_choice(args, manifest: dict | None, checkpoint, quiet: bool = False
                 ) -> DiscScale | None:
    """The disc scale of a --scale auto run, None for --scale none or a model whose scale
    is unknown (its one line printed: the run goes on unscaled)."""
    check_scale_args(args)
    if args.scale == "none":
        return None
    scale, line = model_scale(manifest, checkpoint, args.disc_scale)
    if scale is None or not quiet:
        print(line, file=sys.stderr)
    return scale


def scale_config(scale: DiscScale | None) -> dict:
    """The report's config fields for the scale choice."""
    return {"scale": "none"} if scale is None else {"scale": "auto",
                                                    "disc_scale": scale.to_json()}


__all__ = ["add_scale_args", "check_scale_args", "scale_choice", "scale_config"]

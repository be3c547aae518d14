"""Whole photographs on the command line: --roi, --roi-threshold and --whole."""

from __future__ import annotations

import argparse
from pathlib import Path

from grata import defaults
from grata.errors import GrataError

ROI_HELP = """\
whole photographs:
  grata adapt --whole --out runs/whole
      the embedded default on whole synthetic photographs (made on first use;
      --roi auto implied): find the disc, crop the benchmark's ROI, adapt and
      segment the crop, paste the mask back; Dice on the whole-photograph mask
  grata adapt --data /data/photos --roi auto --out runs/photos ...
      real whole photographs (CSV or DoFE layout, full-size masks); a photograph
      whose disc is not found (score below --roi-threshold) is skipped with its
      reason; report.json has each image's box and score under "roi"
"""


def add_roi_args(p: argparse.ArgumentParser) -> None:
    """--roi auto|none, --roi-threshold, --whole."""
    from grata.roi import SCORE_THRESHOLD
    p.add_argument("--roi", choices=["none", "auto"], default=None,
                   help="none: the images are crops around the disc (default); auto: "
                   "whole photographs, the disc is localised and the ROI cut, and the "
                   "mask is pasted back and scored at the photograph's size")
    p.add_argument("--roi-threshold", type=float, default=SCORE_THRESHOLD,
                   help=f"with --roi auto: localisation score below which a photograph is "
                   f"skipped (default {SCORE_THRESHOLD})")
    p.add_argument("--whole", action="store_true",
                   help="the synthetic whole-photograph benchmark (generated on first use "
                   "into the cache) instead of --data; implies --roi auto")


def roi_choice(args, progress: bool):
    """(data root or None to keep --data / the crop default, RoiOptions or None)."""
    from grata.domains import RoiOptions
    if args.whole and args.data is not None:
        raise GrataError("--whole is the synthetic whole-photograph benchmark; "
                         "with --data use --roi auto")
    if args.whole and args.roi == "none":
        raise GrataError("--whole needs --roi auto (its images are whole photographs)")
    if not 0.0 <= args.roi_threshold <= 1.0:
        raise GrataError(f"--roi-threshold must be in [0, 1], got {args.roi_threshold}")
    mode = "auto" if args.whole else (args.roi or "none")
    roi = RoiOptions(threshold=args.roi_threshold) if mode == "auto" else None
    root = defaults.whole_root(progress=progress) if args.whole else None
    return root, roi


def roi_config(roi) -> dict:
    """The report's config fields for the ROI choice."""
    return {"roi": "none"} if roi is None else {"roi": "auto",
                                                "roi_threshold": roi.threshold}


def save_overlay(sample, pred, path: Path) -> None:
    """The overlay of a scored image: the crop's, or the whole photograph's with its box."""
    from grata.report import overlay, photo_overlay, save_png_atomic
    photo = getattr(sample, "photo", None)
    img = overlay(sample.image, pred, sample.target) if photo is None else \
        photo_overlay(photo.pixels, pred, photo.target, photo.box)
    save_png_atomic(img, path)

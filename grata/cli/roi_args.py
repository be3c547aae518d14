"""Whole photographs on the command line: --roi, --roi-threshold and --whole."""

from __future__ import annotations

import argparse
from pathlib import Path

from grata import defaults
from grata.domains import RoiOptions
from grata.errors import GrataError
from grata.report import overlay, photo_overlay, save_png_atomic
from grata.roi import SCORE_THRESHOLD

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
  grata adapt --data /data/photos --roi auto --scale auto --out runs/scaled ...
      the box around the disc found is sized so the disc has the model's
      training size; a photograph the localiser doubts is kept when the model
      finds a plausible disc there ("second_opinion" under "roi"), skipped
      only when both fail
"""


def add_roi_args(p: argparse.ArgumentParser, whole: bool = True, missed: str = "skipped",
                 note: str = " and scored there") -> None:
    """--roi none|auto and --roi-threshold, and with `whole` --whole (the synthetic
    whole-photograph benchmark). `missed`: what the verb does with a photograph whose disc
    is not found; `note`: what it does with the pasted-back mask."""
    p.add_argument("--roi", choices=["none", "auto"], default=None,
                   help="none: the images are crops around the optic disc (default); auto: "
                   "whole fundus photographs: the disc is found, the benchmark's ROI cut and "
                   f"segmented, and the mask pasted back at the photograph's size{note}; a "
                   f"photograph whose disc is not found is {missed} with the reason, never "
                   "segmented blindly")
    p.add_argument("--roi-threshold", type=float, default=None, metavar="SCORE",
                   help=f"with --roi auto: localisation score below which a photograph is "
                   f"{missed} (default {SCORE_THRESHOLD})")
    if whole:
        p.add_argument("--whole", action="store_true",
                       help="the synthetic whole-photograph benchmark (generated on first "
                       "use into the cache) instead of --data; implies --roi auto")


def _threshold(args) -> float:
    """--roi-threshold, or the localiser's default; outside [0, 1] is one line."""
    threshold = SCORE_THRESHOLD if args.roi_threshold is None else args.roi_threshold
    if not 0.0 <= threshold <= 1.0:
        raise GrataError(f"--roi-threshold must be in [0, 1], got {threshold}")
    return threshold


def roi_choice(args, progress: bool):
    """(data root or None to keep --data / the crop default, RoiOptions or None), for a
    verb with --whole."""
    if args.whole and args.data is not None:
        raise GrataError("--whole is the synthetic whole-photograph benchmark; "
                         "with --data use --roi auto")
    if args.whole and args.roi == "none":
        raise GrataError("--whole needs --roi auto (its images are whole photographs)")
    threshold = _threshold(args)
    mode = "auto" if args.whole else (args.roi or "none")
    roi = RoiOptions(threshold=threshold) if mode == "auto" else None
    root = defaults.whole_root(progress=progress) if args.whole else None
    return root, roi


def roi_options(args):
    """RoiOptions for --roi auto, None for crops, for a verb without --whole: there
    --roi-threshold without --roi auto is a mistake (one line)."""
    threshold = _threshold(args)
    if (args.roi or "none") == "none":
        if args.roi_threshold is not None:
            raise GrataError("--roi-threshold goes with --roi auto")
        return None
    return RoiOptions(threshold=threshold)


def roi_config(roi) -> dict:
    """The report's config fields for the ROI choice."""
    return {"roi": "none"} if roi is None else {"roi": "auto",
                                                "roi_threshold": roi.threshold}


def save_overlay(sample, pred, path: Path) -> None:
    """The overlay of a scored image: the crop's, or the whole photograph's with its box."""
    photo = getattr(sample, "photo", None)
    img = overlay(sample.image, pred, sample.target) if photo is None else \
        photo_overlay(photo.pixels, pred, photo.target, photo.box)
    save_png_atomic(img, path)

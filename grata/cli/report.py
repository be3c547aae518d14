"""`grata report`: one self-contained HTML page of an adapt run or a serve outbox."""

from __future__ import annotations

import argparse
from pathlib import Path

from grata.report_html import DEFAULT_VCDR_THRESHOLD, write_report


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 10:  # a vCDR lies in [0, 1]; anything else is a typo
        raise argparse.ArgumentTypeError(f"a vCDR threshold is a number in (0, 10), not {text!r}")
    return value


def add_html_args(p, what: str) -> None:
    """--html (and the vCDR flag threshold) for a verb that leaves results behind."""
    p.add_argument("--html", action="store_true",
                   help=f"also write {what}/report.html: one self-contained page (no network) "
                   "for the people who look at the results")
    p.add_argument("--vcdr-threshold", type=_threshold, default=DEFAULT_VCDR_THRESHOLD,
                   help="vCDR above which a photograph is flagged in the HTML report "
                   f"(default {DEFAULT_VCDR_THRESHOLD}, a common referral cue)")


def register(subparsers) -> dict:
    r = subparsers.add_parser(
        "report", help="write the HTML report of an adapt run or a serve outbox",
        description="Write PATH/report.html from an adapt run folder (report.json and "
        "overlays/) or a serve outbox (the per-image JSON records): one self-contained page "
        "with images and plots inlined, readable offline, on a tablet and on paper.")
    r.add_argument("path", type=Path, help="an adapt --out folder, its report.json, or a "
                   "serve --outbox folder")
    r.add_argument("--vcdr-threshold", type=_threshold, default=DEFAULT_VCDR_THRESHOLD,
                   help=f"flag a served photograph above this vCDR (default "
                   f"{DEFAULT_VCDR_THRESHOLD})")
    r.add_argument("--no-plots", action="store_true",
                   help="leave out the Dice-over-stream plots (no matplotlib needed)")
    return {"report": cmd_report}


def cmd_report(args) -> int:
    page = write_report(args.path, vcdr_threshold=args.vcdr_threshold,
                        plots=not args.no_plots)
    print(f"wrote {page}")
    return 0

"""`grata synth`: write the synthetic multi-centre fundus benchmark."""

from __future__ import annotations

from pathlib import Path

from grata.errors import GrataError
from grata.synth import generate
from grata.synth_whole import generate_whole


def register(subparsers) -> dict:
    s = subparsers.add_parser(
        "synth", help="write the synthetic multi-centre fundus benchmark",
        description="Write a deterministic synthetic fundus benchmark in the GraTa CSV "
        "layout: one source domain and several target domains with camera/centre shifts. "
        "The same seed gives identical files. --whole writes whole photographs instead "
        "of crops around the disc (field of view on black, left and right eyes, "
        "full-size masks, the true discs in synth.json), for `grata adapt --roi auto`.")
    s.add_argument("--out", required=True, type=Path, help="folder to write (created)")
    s.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    s.add_argument("--whole", action="store_true",
                   help="whole photographs instead of ROI crops")
    s.add_argument("--width", type=int,
                   help="with --whole: the photographs' width in pixels (height 0.78 of it; "
                   "default 1024)")
    return {"synth": cmd_synth}


def cmd_synth(args) -> int:
    if args.width is not None and not args.whole:
        raise GrataError("--width goes with --whole (the crops' size is fixed)")
    if args.whole:
        summary = generate_whole(args.out, seed=args.seed, size=args.width or 1024,
                                 progress=True)
    else:
        summary = generate(args.out, seed=args.seed, progress=True)
    print(f"wrote {args.out}: {summary}")
    return 0

"""`grata synth`: write the synthetic multi-centre fundus benchmark."""

from __future__ import annotations

from pathlib import Path


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
                   help="whole photographs (1024 x 800) instead of ROI crops")
    return {"synth": cmd_synth}


def cmd_synth(args) -> int:
    if args.whole:
        from ..synth_whole import generate_whole
        summary = generate_whole(args.out, seed=args.seed, progress=True)
    else:
        from ..synth import generate
        summary = generate(args.out, seed=args.seed, progress=True)
    print(f"wrote {args.out}: {summary}")
    return 0

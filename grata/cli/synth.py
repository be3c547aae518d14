"""`grata synth`: write the synthetic multi-centre fundus benchmark."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> dict:
    s = subparsers.add_parser(
        "synth", help="write the synthetic multi-centre fundus benchmark",
        description="Write a deterministic synthetic fundus benchmark in the GraTa CSV "
        "layout: one source domain and several target domains with camera/centre shifts. "
        "The same seed gives identical files.")
    s.add_argument("--out", required=True, type=Path, help="folder to write (created)")
    s.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    return {"synth": cmd_synth}


def cmd_synth(args) -> int:
    from ..synth import generate
    summary = generate(args.out, seed=args.seed, progress=True)
    print(f"wrote {args.out}: {summary}")
    return 0

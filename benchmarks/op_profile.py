"""Where a GraTa image's time goes in the runtime: onnxruntime's per-node profile of the
engine's graphs over a few images, summed per operator type and per kind (convolutions,
InstanceNormalization, the rest: elementwise, reductions, layout).

    OMP_NUM_THREADS=1 python benchmarks/op_profile.py --arch edge --size 512 --threads 2

Random weights (torch.manual_seed(0)), the artifacts `grata bench adapt` uses, the
engine's default settings. Profiling adds a fixed cost per node, so the totals exceed an
unprofiled image's time (most for graphs of many small nodes): read the shares, not the
milliseconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from grata.artifacts import random_model_artifacts
from grata.bench.workers import bench_image
from grata.engine_chooser import open_engine
from grata.methods import create

KINDS = {"Conv": "convolution", "ConvTranspose": "convolution",
         "InstanceNormalization": "instance norm"}


def node_times(profile: Path) -> collections.Counter:
    """Microseconds per operator type in one onnxruntime profile file."""
    out: collections.Counter = collections.Counter()
    for event in json.loads(profile.read_text()):
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            out[event["args"]["op_name"]] += event["dur"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="edge", choices=("edge", "resnet18", "resnet34"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=3, help="profiled images (after 1 warm-up)")
    ap.add_argument("--top", type=int, default=12, help="operator types listed")
    args = ap.parse_args()
    folder = random_model_artifacts(args.arch, args.size, 0, quiet=False)
    with tempfile.TemporaryDirectory() as tmp:
        engine = open_engine(folder, threads=args.threads,
                             tuning={"profile": str(Path(tmp) / "p")})
        method = create("grata", engine, seed=0)
        first = bench_image(0, engine.size)
        method.adapt(engine.to_input(first), image=first)  # warm-up, in the profile too
        t0 = time.perf_counter()
        for i in range(args.images):
            img = bench_image(i + 1, engine.size)
            method.adapt(engine.to_input(img), image=img)
        wall = (time.perf_counter() - t0) / args.images
        per_op: collections.Counter = collections.Counter()
        for session in engine.sessions.opened().values():
            per_op += node_times(Path(session.end_profiling()))
    runs = args.images + 1
    total = sum(per_op.values()) / runs / 1e3
    print(f"{args.arch} {args.size}x{args.size}, {args.threads} threads: {wall * 1e3:.1f} ms "
          f"per profiled image, {total:.1f} ms of it in graph nodes")
    kinds: collections.Counter = collections.Counter()
    for op, us in per_op.items():
        kinds[KINDS.get(op, "elementwise, reductions, layout")] += us
    for kind, us in kinds.most_common():
        print(f"  {kind:34s} {us / runs / 1e3:8.1f} ms  {100 * us / sum(kinds.values()):5.1f} %")
    print("  per operator type:")
    for op, us in per_op.most_common(args.top):
        print(f"    {op:32s} {us / runs / 1e3:8.1f} ms  {100 * us / sum(per_op.values()):5.1f} %")


if __name__ == "__main__":
    main()

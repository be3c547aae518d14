"""`grata bench`: latency and memory of what a device runs, per backend and precision.

The command line over `grata.bench` (statistics, probes, workers, suites, tables).

Two suites:

``grata bench`` (stages)
    predict only (``infer``), each graph of one adaptation step (``entropy_grad``,
    ``consistency_grad``), the strong style view (``augment``, numpy), the parameter
    ``update``, and the full per-image GraTa cost
    (``grata``: strong view, both gradients, update, prediction), asked for by name the
    disc-scale stage in front of it (``scale``: streams of crops whose disc is 0.5x, 1.2x
    and 1.6x the model's, each located with the source model and then adapted on; per
    image the time and the source passes of the locate step, before and after the
    stream's estimate settles), per backend
    (``onnx-cpu``, ``onnx-cuda``, ``onnx-tensorrt``, ``torch-cpu``, ``torch-cuda``) and
    precision (``fp32``, ``int8`` = the QDQ artifacts of ``grata calibrate``, ``fp16``).
``grata bench adapt``
    the per-image GraTa cost of the onnx runtime against the PyTorch reference in the
    structure of the authors' code (`grata.bench_reference`), per arch and size, with
    peak memory, FLOPs per image, the implied rate next to the machine's limit (the
    model's convolutions alone, timed in the same worker), start-up (artifacts verified,
    sessions ready) and the load average around each worker.

Method. Every backend configuration runs in its own Python process, so peak resident
memory (VmHWM) is that configuration's alone; all workers get the same glibc malloc
settings (``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, see MALLOC_SETTINGS):
fixed thresholds, because glibc otherwise raises its mmap threshold after large frees
and time and peak would depend on allocation history. Timings: warm-up
calls first, then a fixed number of iterations or a duration; min / mean / median / p90
/ p99 (linear interpolation between order statistics, numpy's default) and throughput
= 1 / mean. GPU work is synchronised before each clock read. The machine, versions,
load average and settings are recorded with the numbers. Random weights are fine for
timing (dense convolutions cost the same whatever the values).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grata.bench.reporting import format_adapt, format_stages
from grata.bench.settings import (
    ADAPT_BACKENDS,
    MALLOC_SETTINGS,
    SCALE_STAGE,
    STAGE_BACKENDS,
    STAGE_CHOICES,
    STAGES,
)
from grata.bench.suites import run_adapt, run_stages
from grata.errors import GrataError
from grata.export.manifest import PRECISIONS
from grata.report import write_json_atomic
from grata.runtime.ort_session import TUNING

EPILOG = """\
suites:
  grata bench [stages]   latency of predict / entropy_grad / consistency_grad / update /
                         the full GraTa image, per backend and precision
  grata bench adapt      per-image GraTa cost, onnx runtime vs the PyTorch reference in
                         the authors' structure, with peak memory and FLOP rates

examples:
  grata bench                                   the embedded default model, every backend
                                                this machine has, fp32 and int8
  grata bench --backends onnx-cpu --precisions fp32 --stages grata,scale --images 8
                                                the disc-scale stage's cost per image
  grata bench --backends onnx-tensorrt,onnx-cuda --precisions fp32,fp16,int8 \\
      --artifacts art/edge256 --int8 runs/int8/int8 --duration 10
  grata bench adapt --archs resnet34,edge --sizes 256,512 --images 10
  grata bench adapt --archs edge --sizes 256 --images 3 --warmup 1     (a quick look)
  grata bench adapt --backends onnx,onnx:teacher=6,onnx:arena=shared,torch-ref
      onnx variants: teacher: the consistency graphs' teacher views per pass (1, the
      device default; 2, 3, 6: one batch); """ + "; ".join(f"{k}: {v}" for k, v in TUNING.items()) + """

Each configuration runs in its own process (its own peak memory). The table goes to
stdout, everything (machine, versions, load average, settings, statistics) to --json.
"""


def register(sub) -> dict:
    b = sub.add_parser("bench", help="latency and memory per backend and precision",
                       description="Benchmark what a device runs: warm-up, then a fixed "
                       "number of iterations or a duration; min / mean / median / p90 / p99, "
                       "throughput, peak host (and device) memory; a table and a JSON file.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("suite", nargs="?", default="stages", choices=["stages", "adapt"],
                   help="stages (default) or adapt")
    b.add_argument("--artifacts", type=Path, help="stages: float32 artifact folder (default: "
                   "the shipped edge model at the default size; random weights if absent)")
    b.add_argument("--int8", type=Path, help="stages: INT8 artifacts from grata calibrate "
                   "(default: a min-max calibration made once into the cache)")
    b.add_argument("--fp16", type=Path, help="stages: FP16 artifacts from grata calibrate "
                   "--fp16, for the CPU and CUDA providers (default: converted once into the "
                   "cache); TensorRT's fp16 builds from the float32 graphs")
    b.add_argument("--checkpoint", type=Path, help="stages: checkpoint for the torch backends "
                   "(default: random weights of the artifacts' arch)")
    b.add_argument("--size", type=int, help="stages: input size of the default model "
                   "(default: the embedded default's)")
    b.add_argument("--backends", help="stages: comma-separated from "
                   f"{', '.join(STAGE_BACKENDS)}, or auto (default: all available); adapt: "
                   f"from {', '.join(ADAPT_BACKENDS)} with onnx:key=value+... variants "
                   "(default onnx,torch-ref)")
    b.add_argument("--precisions", default="auto", help="stages: comma-separated from "
                   f"{', '.join(PRECISIONS)} (default fp32,int8, plus fp16 on a GPU)")
    b.add_argument("--stages", default=",".join(STAGES), help="stages: which, from "
                   f"{', '.join(STAGE_CHOICES)} (default all but {SCALE_STAGE})")
    b.add_argument("--archs", default="resnet34,edge", help="adapt: archs (resnet34,edge)")
    b.add_argument("--sizes", default="256,512", help="adapt: input sizes (256,512)")
    b.add_argument("--images", type=int, default=10, help="adapt: timed images; stages: "
                   f"images per stream of the {SCALE_STAGE} stage (10)")
    b.add_argument("--matmul", type=int, default=2048,
                   help="adapt: matrix size of the float32 matmul rate (2048)")
    b.add_argument("--limit-reps", type=int, default=3,
                   help="adapt: timed runs of the model's convolutions alone, the machine's "
                   "limit, in each worker after its images (3; 0: not measured)")
    b.add_argument("--warmup", type=int, help="warm-up calls (stages 3) or images (adapt 2)")
    b.add_argument("--iterations", type=int, default=20, help="stages: timed calls (20)")
    b.add_argument("--duration", type=float, help="stages: seconds per stage instead")
    b.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    b.add_argument("--seed", type=int, default=0, help="seed of weights and strong views")
    b.add_argument("--malloc", default="large", choices=list(MALLOC_SETTINGS),
                   help="glibc malloc thresholds given to every worker alike: large (32 MiB "
                   "mmap threshold, default), small (128 KiB: RSS follows live memory, big "
                   "buffers re-fault every call), system (the environment's)")
    b.add_argument("--timeout", type=float, default=3600, help="seconds per worker (3600)")
    b.add_argument("--json", type=Path, default=Path("bench.json"),
                   help="where to write the JSON report (default bench.json)")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    return {"bench": cmd_bench}


def cmd_bench(args) -> int:
    if args.warmup is None:
        args.warmup = 3 if args.suite == "stages" else 2
    if args.suite == "stages":
        if args.backends is None:
            args.backends = "auto"
        if args.iterations < 1 or (args.duration is not None and args.duration <= 0):
            raise GrataError("--iterations must be at least 1 and --duration positive")
        report = run_stages(args)
        text = format_stages(report)
    else:
        if args.backends is None:
            args.backends = "onnx,torch-ref"
        report = run_adapt(args)
        text = format_adapt(report)
    write_json_atomic(args.json, report)
    print(text)
    print(f"\nreport: {args.json}")
    failed = [r for r in report["results"] if r.get("error")]
    return 1 if failed and len(failed) == len(report["results"]) else 0


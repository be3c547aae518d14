"""The two suites of `grata bench`: `run_stages` (per stage, backend and precision) and
`run_adapt` (GraTa per image against the PyTorch reference), and what they measure on."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

from grata import defaults
from grata.artifacts import default_artifacts, random_model_artifacts
from grata.bench.convlimit import conv_graph
from grata.bench.probes import gpu_info, machine_info, matmul_rate, versions
from grata.bench.settings import (
    ADAPT_BACKENDS,
    FORMAT_VERSION,
    FORWARDS_PER_IMAGE,
    MALLOC_SETTINGS,
    SCALE_STAGE,
    STAGE_BACKENDS,
    STAGE_CHOICES,
)
from grata.bench.workers import parse_variant, run_worker
from grata.calibration.quantize import convert_fp16, quantize_artifacts
from grata.disc_scale import model_scale
from grata.errors import GrataError
from grata.export import DEVICE_TEACHER_VIEWS
from grata.export.manifest import PRECISIONS, load_manifest
from grata.runtime.ort_session import available_providers, default_threads
from grata.sizes import check_size
from grata.synth import SOURCE_DOMAIN

log = logging.getLogger(__name__)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int8_artifacts(fp32: Path, quiet: bool) -> Path:
    """A QDQ INT8 copy of fp32 artifacts (calibrated on 16 synthetic source images),
    made once into the cache. Good enough for timing; `grata calibrate` makes the one
    to ship and scores it."""
    m = load_manifest(fp32, verify=False)
    if m.get("precision", {}).get("infer", "fp32") != "fp32":
        return fp32
    folder = defaults.cache_dir() / "bench" / f"int8-{m['manifest_sha256'][:16]}"
    if not (folder / "manifest.json").exists():
        images = defaults.synthetic_root(progress=not quiet) / SOURCE_DOMAIN / "train" / "image"
        if not quiet:
            print(f"calibrating INT8 artifacts into {folder} (once)", file=sys.stderr)
        quantize_artifacts(fp32, images, folder, max_images=16)
    return folder


def _fp16_artifacts(fp32: Path, quiet: bool) -> Path:
    m = load_manifest(fp32, verify=False)
    folder = defaults.cache_dir() / "bench" / f"fp16-{m['manifest_sha256'][:16]}"
    if not (folder / "manifest.json").exists():
        if not quiet:
            print(f"converting to FP16 into {folder} (once)", file=sys.stderr)
        convert_fp16(fp32, folder)
    return folder


# ----------------------------------------------------------------------------- suites

def _available_backends() -> list[str]:
    out = []
    have = available_providers()
    if have:
        out.append("onnx-cpu")
        if "CUDAExecutionProvider" in have:
            out.append("onnx-cuda")
        if "TensorrtExecutionProvider" in have:
            out.append("onnx-tensorrt")
    if importlib.util.find_spec("torch") is not None:
        out.append("torch-cpu")
        try:
            import torch
            if torch.cuda.is_available():
                out.append("torch-cuda")
        except Exception as exc:  # noqa: BLE001  (as in gpu_info)
            log.debug("torch sees no usable GPU: %s", exc)
    return out


def stages_plan(backends: list[str], precisions: list[str] | None) -> list[tuple[str, str, str | None]]:
    """(backend, precision, reason it is skipped or None) for every pair asked for.
    Default precisions: fp32 and int8, plus fp16 on a GPU backend."""
    plan = []
    for b in backends:
        if b not in STAGE_BACKENDS:
            raise GrataError(f"unknown backend {b!r}; choose from {', '.join(STAGE_BACKENDS)}")
        wanted = precisions or (["fp32", "int8"] + (["fp16"] if b.endswith(("cuda", "tensorrt"))
                                                   else []))
        for p in wanted:
            if p not in PRECISIONS:
                raise GrataError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
            reason = None
            if b.startswith("torch") and p != "fp32":
                reason = "the torch backend runs fp32 only"
            plan.append((b, p, reason))
    return plan


def run_stages(args) -> dict:
    quiet = args.quiet
    if args.artifacts is not None:
        fp32, weights = args.artifacts, f"artifacts {args.artifacts}"
    else:
        fp32, weights = default_artifacts(args.size, quiet)
    m = load_manifest(fp32)
    if m.get("precision", {}).get("infer", "fp32") != "fp32":
        raise GrataError(f"--artifacts {fp32} is not float32; pass the float32 folder and "
                         f"the quantised one with --int8")
    backends = _csv(args.backends) if args.backends != "auto" else _available_backends()
    precisions = None if args.precisions == "auto" else _csv(args.precisions)
    stages = _csv(args.stages)
    bad = [s for s in stages if s not in STAGE_CHOICES]
    if bad:
        raise GrataError(f"unknown stage {bad[0]!r}; choose from {', '.join(STAGE_CHOICES)}")
    scale = None
    if SCALE_STAGE in stages:
        if args.images < 1:
            raise GrataError("--images (per stream of the scale stage) must be at least 1")
        scale, line = model_scale(m, args.checkpoint)
        if scale is None:
            raise GrataError(f"--stages {SCALE_STAGE}: {line}")
    plan = stages_plan(backends, precisions)
    threads = args.threads
    if threads is None:
        threads = default_threads()
    settings = {"suite": "stages", "artifacts": str(fp32), "weights": weights,
                "arch": m["arch"], "size": m["size"], "stages": stages, "warmup": args.warmup,
                "iterations": None if args.duration else args.iterations,
                "duration_s": args.duration, "threads": threads, "seed": args.seed,
                "malloc": {"setting": args.malloc, **MALLOC_SETTINGS[args.malloc]},
                "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                "scale_images": args.images if scale else None,
                "disc_scale": scale.to_json() if scale else None}
    rows = []
    for backend, precision, reason in plan:
        row = {"backend": backend, "precision": precision}
        if reason:
            rows.append({**row, "skipped": reason})
            continue
        try:
            folder = fp32
            if precision == "int8":
                folder = args.int8 or _int8_artifacts(Path(fp32), quiet)
            elif precision == "fp16" and backend != "onnx-tensorrt":
                folder = args.fp16 or _fp16_artifacts(Path(fp32), quiet)
        except GrataError as exc:
            rows.append({**row, "skipped": str(exc)})
            continue
        spec = {"suite": "stages", "backend": backend, "precision": precision,
                "artifacts": str(folder), "size": m["size"], "arch": m["arch"],
                "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                "seed": args.seed, "threads": threads, "stages": stages,
                "warmup": args.warmup, "iterations": args.iterations,
                "duration": args.duration, "scale_images": args.images,
                "disc_scale": scale.to_json() if scale else None,
                "cache": str(defaults.cache_dir() / "trt-ep")}
        if not quiet:
            print(f"  {backend} {precision} ...", file=sys.stderr, flush=True)
        result = run_worker(spec, args.malloc, timeout=args.timeout)
        rows.append({**row, "artifacts": str(folder), **result})
    return {"format_version": FORMAT_VERSION, "suite": "stages", "machine": machine_info(),
            "gpu": gpu_info(), "versions": versions(), "settings": settings, "results": rows}



def run_adapt(args) -> dict:
    import torch  # the reference, FLOP counts and the exports need it

    from grata.export.trace import TEACHER_VIEW_CHOICES
    from grata.models import ResUnet, flops

    archs, sizes = _csv(args.archs), [int(s) for s in _csv(args.sizes)]
    backends = _csv(args.backends)
    views = {}  # backend -> teacher views per pass of its artifacts
    for b in backends:
        name, opts = parse_variant(b)
        if name not in ADAPT_BACKENDS:
            raise GrataError(f"unknown backend {name!r}; choose from {', '.join(ADAPT_BACKENDS)}")
        if name != "onnx" and set(opts) - {"heap"}:
            raise GrataError(f"{b}: the torch backends take only heap=keep|system; "
                             "the other options apply to the onnx backend")
        if opts.get("heap", "keep") not in ("keep", "system"):
            raise GrataError(f"{b}: heap={opts['heap']}: choose from keep, system")
        if name == "onnx":
            choices = [str(k) for k in TEACHER_VIEW_CHOICES]
            teacher = opts.get("teacher", str(DEVICE_TEACHER_VIEWS))
            if teacher not in choices:
                raise GrataError(f"{b}: teacher={teacher}: choose from {', '.join(choices)}")
            views[b] = int(teacher)
    threads = args.threads
    if threads is None:
        threads = default_threads()
    if args.images < 1 or args.warmup < 0:
        raise GrataError("--images must be at least 1 and --warmup at least 0")
    if not args.quiet:
        print("measuring the float32 matrix-multiply rate ...", file=sys.stderr, flush=True)
    rate = matmul_rate(threads, n=args.matmul)
    settings = {"suite": "adapt", "archs": archs, "sizes": sizes, "backends": backends,
                "images": args.images, "warmup": args.warmup, "threads": threads,
                "seed": args.seed, "weights": f"random (torch.manual_seed({args.seed}))",
                "malloc": {"setting": args.malloc, **MALLOC_SETTINGS[args.malloc]},
                "flops_convention": f"{FORWARDS_PER_IMAGE} forward passes per image "
                                    "(9 forwards + 2 backwards at 2 forwards each)",
                "limit": "the model's convolutions alone (same shapes, one graph of "
                         "independent layers), timed in each worker after its images "
                         f"({args.limit_reps} runs, median)" if args.limit_reps else None,
                "device_teacher_views": DEVICE_TEACHER_VIEWS}
    rows = []
    for arch in archs:
        for size in sizes:
            check_size(size, "--sizes: each size")
            torch.manual_seed(args.seed)
            forward = flops(ResUnet(arch), size)
            folders = {k: random_model_artifacts(arch, size, args.seed, args.quiet, k)
                       for k in sorted(set(views.values()))}
            limit = None
            if args.limit_reps:
                path = defaults.cache_dir() / "bench" / f"{arch}-{size}-seed{args.seed}-convs.onnx"
                limit = conv_graph(arch, size, args.seed, path)
                limit["reps"] = args.limit_reps
            for backend in backends:
                folder = folders.get(views.get(backend))
                spec = {"suite": "adapt", "backend": backend, "arch": arch, "size": size,
                        "artifacts": str(folder) if folder else None, "seed": args.seed,
                        "threads": threads, "images": args.images, "warmup": args.warmup,
                        "limit": limit}
                if not args.quiet:
                    print(f"  {arch} {size} {backend} ...", file=sys.stderr, flush=True)
                result = run_worker(spec, args.malloc, timeout=args.timeout)
                row = {"arch": arch, "size": size, "backend": backend,
                       "teacher_views": views.get(backend), "forward_flops": forward,
                       "flops_per_image": FORWARDS_PER_IMAGE * forward, **result}
                if not result.get("error"):
                    med = result["per_image"]["median_ms"] / 1e3
                    row["gflops_per_s"] = row["flops_per_image"] / med / 1e9
                    if result.get("limit"):
                        row["limit_fraction"] = row["gflops_per_s"] / \
                            result["limit"]["gflops_per_s"]
                rows.append(row)
            ref = next((r for r in rows if r["arch"] == arch and r["size"] == size
                        and r["backend"] == "torch-ref" and not r.get("error")), None)
            for r in rows:
                if ref and r["arch"] == arch and r["size"] == size and not r.get("error"):
                    r["time_vs_torch_ref"] = r["per_image"]["median_ms"] / \
                        ref["per_image"]["median_ms"]
                    r["peak_rss_vs_torch_ref"] = r["memory"]["peak_rss_bytes"] / \
                        ref["memory"]["peak_rss_bytes"]
    return {"format_version": FORMAT_VERSION, "suite": "adapt", "machine": machine_info(),
            "gpu": gpu_info(), "versions": versions(), "settings": settings,
            "matmul": rate, "results": rows}


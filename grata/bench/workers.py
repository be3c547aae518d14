"""Measurements in their own processes: the engines a configuration runs, the stage and
adapt workers, and `run_worker` (a fresh interpreter per configuration, so its peak
memory is its own)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from grata.disc_scale import DiscScale
from grata.engine_chooser import open_engine
from grata.errors import GrataError
from grata.pipeline import ImagePipeline
from grata.scale_stage import source_predict
from grata.bench.probes import DeviceMemoryPeak, minor_faults, peak_rss_bytes, rss_bytes
from grata.bench.settings import (
    ADAPT_BACKENDS,
    MALLOC_KEYS,
    MALLOC_SETTINGS,
    RESULT_TAG,
    SCALE_STAGE,
)
from grata.bench.stats import measure, summarize


def bench_image(index: int, size: int) -> np.ndarray:
    """A deterministic fundus-like test image [3,S,S] in [0,1]: smooth colour blobs and
    fine noise (timing does not depend on content; the strong view needs a real range)."""
    rng = np.random.default_rng(1000 + index)
    coarse = rng.random((3, 8, 8), dtype=np.float32)
    reps = -(-size // 8)
    img = np.kron(coarse, np.ones((1, reps, reps), np.float32))[:, :size, :size]
    img = img + 0.1 * rng.random((3, size, size), dtype=np.float32)
    img = img - img.min()
    return (img / img.max()).astype(np.float32)


# ----------------------------------------------------------------------------- engines

def parse_variant(spec: str) -> tuple[str, dict]:
    """'onnx:arena=1+share=0' -> ('onnx', {'arena': '1', 'share': '0'})."""
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split("+")):
        key, eq, value = item.partition("=")
        if not eq:
            raise GrataError(f"backend option {item!r} in {spec!r} is not key=value")
        opts[key.strip()] = value.strip()
    return name, opts




def make_onnx_engine(artifacts, device: str = "cpu", precision: str = "fp32",
                     threads: int | None = None, options: dict | None = None,
                     cache_dir: Path | None = None):
    """The runtime's engine when nothing is changed (`open_engine`: OrtEngine on a CPU,
    CudaEngine with device arrays on CUDA); otherwise an OrtEngine whose sessions get the
    provider options of `precision` (TensorRT) and the session tuning `options` (see
    `grata.runtime.ort_session.TUNING`), which the runtime's device names do not carry."""
    # CudaEngine keeps its arrays in CuPy; without it, the CUDA provider with host arrays
    # (the report's "engine" field says which ran)
    host = device == "cuda" and importlib.util.find_spec("cupy") is None
    return open_engine(artifacts, device, threads, host_arrays=host, precision=precision,
                       cache_dir=cache_dir, tuning=options or None)


def _sync_for(backend: str, engine):
    """What makes a timed call wait for the device (None: calls are synchronous)."""
    if backend == "torch-cuda":
        import torch
        return torch.cuda.synchronize
    stream = getattr(engine, "stream", None)  # CudaEngine queues work on its stream
    if stream is not None and hasattr(stream, "synchronize"):
        return stream.synchronize
    return None


def _stage_worker(spec: dict) -> dict:
    """One backend x precision: time each stage. Runs in its own process."""
    from grata.kernels import grata_update
    from grata.methods import create

    backend, precision = spec["backend"], spec["precision"]
    size, seed, threads = spec["size"], spec["seed"], spec.get("threads")
    rss0 = rss_bytes()
    with DeviceMemoryPeak() as device_peak:
        if backend.startswith("onnx-"):
            device = backend.split("-", 1)[1]
            engine = make_onnx_engine(spec["artifacts"], device, precision, threads,
                                      cache_dir=Path(spec["cache"]) if spec.get("cache")
                                      else None)
        else:
            import torch

            from grata.models import ResUnet
            if threads:
                torch.set_num_threads(threads)
            device = "cuda" if backend == "torch-cuda" else "cpu"
            if spec.get("checkpoint"):
                engine = open_engine(device=device, kind="torch", checkpoint=spec["checkpoint"],
                                     arch=spec["arch"])
            else:
                torch.manual_seed(seed)
                engine = open_engine(device=device, kind="torch", model=ResUnet(spec["arch"]))
        size = engine.size or size
        sync = _sync_for(backend, engine)
        rss_setup = rss_bytes()
        rng = np.random.default_rng(seed)
        images = [bench_image(i, size) for i in range(4)]
        from grata.augment import strong_augment
        x = engine.to_input(images[0])
        strong = engine.to_input(strong_augment(images[0], rng))
        pipeline = ImagePipeline(create("grata", engine, seed=seed))
        counter = {"i": 0}

        def full():  # one image's steps, as grata adapt and grata serve run them
            img = images[counter["i"] % len(images)]
            counter["i"] += 1
            pipeline.step(engine.to_input(img), img)

        _, g_a = engine.entropy_grad(x)
        _, g_p = engine.consistency_grad(x, strong)
        # the update on the engine's own arrays (numpy, or device tensors for torch-cuda)
        state = [engine.copy(engine.theta), engine.zeros(), engine.zeros()]
        host_g = (engine.copy(g_p), engine.copy(g_a))
        fns = {"predict": lambda: engine.infer(x),
               "entropy_grad": lambda: engine.entropy_grad(x),
               "consistency_grad": lambda: engine.consistency_grad(x, strong),
               "augment": lambda: strong_augment(images[0], rng),
               "update": lambda: grata_update(state[0], state[1], state[2], host_g[0],
                                              host_g[1], 1, 1e-4),
               "grata": full}
        stages, scale = {}, None
        for name in spec["stages"]:
            if name == SCALE_STAGE:
                times, scale = _scale_stage(spec, engine, size, sync)
            else:
                times = measure(fns[name], spec["warmup"], spec.get("iterations"),
                                spec.get("duration"), sync=sync)
            stages[name] = summarize(times)
    out = {"stages": stages, "scale": scale, "size": size, "engine": type(engine).__name__,
           "memory": {"rss_start_bytes": rss0, "rss_after_setup_bytes": rss_setup,
                      "peak_rss_bytes": peak_rss_bytes(),
                      "device_peak_bytes": device_peak.peak_bytes}}
    if backend == "torch-cuda":
        import torch
        out["memory"]["torch_cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def _scale_stage(spec: dict, engine, size: int, sync) -> tuple[list[float], dict]:
    """The scale stage (`grata.bench.scale_stream.measure_scale`) on this engine: the
    locator's source model through it, a fresh GraTa pipeline per stream."""
    from grata.bench.scale_stream import measure_scale  # the images: PIL, scipy
    from grata.methods import create

    def new_step():
        pipeline = ImagePipeline(create("grata", engine, seed=spec["seed"]))

        def step(x):
            pipeline.step(engine.to_input(x), x)
            if sync is not None:
                sync()
        return step

    scale = DiscScale.from_json(spec["disc_scale"], "the scale stage's disc scale")
    return measure_scale(source_predict(engine), scale, size, new_step,
                         spec["scale_images"], spec["warmup"], spec["seed"])


def _adapt_worker(spec: dict) -> dict:
    """Per-image GraTa cost of one backend on one (arch, size), its start-up, and the
    dense-convolution limit measured after the images (so it is not in the peak RSS).
    Own process."""
    backend, options = parse_variant(spec["backend"])
    options.pop("teacher", None)  # which artifacts: chosen by the parent
    size, seed, threads = spec["size"], spec["seed"], spec["threads"]
    rss0 = rss_bytes()
    t_start = time.perf_counter()
    if backend == "onnx":
        from grata.methods import create
        engine = make_onnx_engine(spec["artifacts"], "cpu", "fp32", threads, options)
        pipeline = ImagePipeline(create("grata", engine, seed=seed))

        def step(img):
            return pipeline.step(engine.to_input(img), img)
    elif backend in ("torch-ref", "torch"):
        import torch
        if options.get("heap") == "keep":  # the runtime's heap setting, for comparison
            from grata.runtime.heap import keep_heap
            keep_heap()

        from grata.models import ResUnet
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        model = ResUnet(spec["arch"])
        if backend == "torch-ref":
            from grata.bench.reference import AuthorsGraTa
            ref = AuthorsGraTa(model, seed=seed)

            def step(img):
                return ref.adapt(img)
        else:
            from grata.methods import create
            pipeline = ImagePipeline(create("grata", model, seed=seed))

            def step(img):
                return pipeline.step(pipeline.engine.to_input(img), img)
    else:
        raise GrataError(f"unknown backend {backend!r}; choose from {', '.join(ADAPT_BACKENDS)}")
    startup = time.perf_counter() - t_start  # artifacts verified, sessions ready
    rss_setup = rss_bytes()
    times, faults = [], []
    for i in range(spec["warmup"] + spec["images"]):
        img = bench_image(i, size)
        f0 = minor_faults()
        t0 = time.perf_counter()
        step(img)
        dt = time.perf_counter() - t0
        if i >= spec["warmup"]:
            times.append(dt)
            faults.append(minor_faults() - f0)
    memory = {"rss_start_bytes": rss0, "rss_after_setup_bytes": rss_setup,
              "peak_rss_bytes": peak_rss_bytes()}
    torch_imported = "torch" in sys.modules
    from grata.runtime.heap import heap_kept
    memory["heap_kept"] = heap_kept()
    limit = None
    if spec.get("limit"):
        from grata.bench.convlimit import conv_rate
        limit = conv_rate(spec["limit"]["path"], spec["limit"]["forward_flops"], threads,
                          spec["limit"].get("reps", 3))
    return {"per_image": summarize(times), "times_s": times, "startup_s": startup,
            "faults_per_image": int(np.median(faults)) if faults else None,
            "memory": memory, "limit": limit, "torch_imported": torch_imported}


WORKERS = {"stages": _stage_worker, "adapt": _adapt_worker}


def worker_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    t0 = time.perf_counter()
    try:
        result = WORKERS[spec["suite"]](spec)
        result["error"] = None
    except Exception as exc:  # noqa: BLE001  (reported as a row; the others go on)
        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    result["wall_s"] = time.perf_counter() - t0
    result["env"] = {k: os.environ.get(k) for k in MALLOC_KEYS}
    sys.stdout.write("\n" + RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


def run_worker(spec: dict, malloc: str = "large", timeout: float | None = None) -> dict:
    """Run one measurement in a fresh interpreter with the glibc malloc settings
    `malloc` (a MALLOC_SETTINGS key); return its result (with the load average before
    and after)."""
    env = dict(os.environ)
    for k in MALLOC_KEYS:
        env.pop(k, None)
    env.update(MALLOC_SETTINGS[malloc])
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    try:
        proc = subprocess.run([sys.executable, "-m", "grata.bench", "--worker", json.dumps(spec)],
                              check=False, capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "load_before": load_before}
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(RESULT_TAG)),
                None)
    if line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        result = {"error": f"worker exited with {proc.returncode}: {tail[:300]}"}
    else:
        result = json.loads(line[len(RESULT_TAG):])
    result["load_before"] = load_before
    result["load_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result

"""`grata bench`: latency and memory of what a device runs, per backend and precision.

Two suites:

``grata bench`` (stages)
    predict only (``infer``), each graph of one adaptation step (``entropy_grad``,
    ``consistency_grad``), the strong style view (``augment``, numpy), the parameter
    ``update``, and the full per-image GraTa cost
    (``grata``: strong view, both gradients, update, prediction), per backend
    (``onnx-cpu``, ``onnx-cuda``, ``onnx-tensorrt``, ``torch-cpu``, ``torch-cuda``) and
    precision (``fp32``, ``int8`` = the QDQ artifacts of ``grata calibrate``, ``fp16``).
``grata bench adapt``
    the per-image GraTa cost of the onnx runtime against the PyTorch reference in the
    structure of the authors' code (`grata.bench_reference`), per arch and size, with
    peak memory, FLOPs per image and the implied rate next to this machine's float32
    matrix-multiply rate.

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
import importlib.util
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .errors import GrataError

log = logging.getLogger(__name__)

STAGES = ("predict", "entropy_grad", "consistency_grad", "augment", "update", "grata")
PRECISIONS = ("fp32", "int8", "fp16")
STAGE_BACKENDS = ("onnx-cpu", "onnx-cuda", "onnx-tensorrt", "torch-cpu", "torch-cuda")
ADAPT_BACKENDS = ("onnx", "torch-ref", "torch")
# glibc malloc settings given to every worker (--malloc). "large": buffers up to 32 MiB
# (glibc's maximum threshold) come from the heap and are reused, as in glibc's own steady
# state once its dynamic threshold has grown, but from the first call on, so no run
# depends on allocation history. "small": every buffer above 128 KiB is its own mapping,
# returned at free: RSS follows live memory closely, and each call pays page faults for
# its big buffers again (measured: +2 s per image for the torch reference at 512).
MALLOC_SETTINGS = {
    "large": {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "67108864"},
    "small": {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"},
    "system": {},
}
MALLOC_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
RESULT_TAG = "GRATA_BENCH_RESULT "
FORMAT_VERSION = 1
# FLOPs of one GraTa image in units of one forward pass: 9 forwards (entropy, 6 teacher
# views, student, final) + 2 backwards counted at 2 forwards each (the usual convention:
# input and weight gradients). The weights are frozen here, so the backwards compute
# input gradients only (~1 forward each): the work actually done is nearer 11 forwards,
# and rates from this count are an upper bound.
FORWARDS_PER_IMAGE = 9 + 2 * 2


# ----------------------------------------------------------------------------- statistics

def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics,
    as numpy's default ('linear') method."""
    v = sorted(float(x) for x in values)
    if not v:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(times_s) -> dict:
    """Statistics of per-call durations in seconds, reported in milliseconds."""
    t = [float(x) for x in times_s]
    if not t:
        return {"n": 0, "min_ms": None, "mean_ms": None, "median_ms": None, "p90_ms": None,
                "p99_ms": None, "max_ms": None, "std_ms": None, "throughput_per_s": None,
                "total_s": 0.0}
    mean = sum(t) / len(t)
    std = math.sqrt(sum((x - mean) ** 2 for x in t) / len(t))
    return {"n": len(t), "min_ms": 1e3 * min(t), "mean_ms": 1e3 * mean,
            "median_ms": 1e3 * percentile(t, 50), "p90_ms": 1e3 * percentile(t, 90),
            "p99_ms": 1e3 * percentile(t, 99), "max_ms": 1e3 * max(t), "std_ms": 1e3 * std,
            "throughput_per_s": 1.0 / mean if mean > 0 else None, "total_s": sum(t)}


def measure(fn, warmup: int = 3, iterations: int | None = 20, duration: float | None = None,
            clock=time.perf_counter, sync=None) -> list[float]:
    """Call fn `warmup` times untimed, then time it `iterations` times, or for at least
    `duration` seconds (at least once) when given. `sync` (e.g. a device synchronise)
    runs inside the timed region after each call. Returns the durations in seconds."""
    if iterations is None and duration is None:
        raise ValueError("give iterations or a duration")
    for _ in range(max(0, warmup)):
        fn()
        if sync is not None:
            sync()
    times: list[float] = []
    spent = 0.0
    while True:
        if duration is None and len(times) >= iterations:
            break
        if duration is not None and times and spent >= duration:
            break
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        dt = clock() - t0
        times.append(dt)
        spent += dt
    return times


# ----------------------------------------------------------------------------- machine

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM; ru_maxrss where /proc is absent)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    return kib * 1024


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _cpu_model() -> str:
    for path, key in (("/proc/cpuinfo", "model name"), ("/proc/cpuinfo", "Model")):
        try:
            with open(path) as f:
                for line in f:
                    if line.split(":")[0].strip() == key:
                        return line.split(":", 1)[1].strip()
        except OSError:
            break
    return platform.processor() or platform.machine()


def _device_model() -> str | None:
    try:  # Jetson and other device-tree boards
        return Path("/proc/device-tree/model").read_text().strip("\0\n ") or None
    except OSError:
        return None


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """What the numbers were measured on (recorded in every report)."""
    from .export.session import default_threads, physical_cores
    info = {"platform": platform.platform(),
            "machine": platform.machine(), "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
            "default_threads": default_threads(), "memory_bytes": _mem_total(),
            "board": _device_model(), "load_average": list(os.getloadavg())
            if hasattr(os, "getloadavg") else None,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return info


def versions() -> dict:
    from . import __version__
    out = {"grata": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "tensorrt",
                "cuda-python", "scipy"):
        v = _version(pkg)
        if v is not None:
            out[pkg] = v
    try:
        import onnxruntime as ort
        out["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    return out


def gpu_info() -> dict | None:
    """Name and memory of the first CUDA device, if torch or cuda-python sees one."""
    try:
        if importlib.util.find_spec("torch") is not None:
            import torch
            if torch.cuda.is_available():
                p = torch.cuda.get_device_properties(0)
                return {"name": p.name, "memory_bytes": int(p.total_memory),
                        "capability": f"{p.major}.{p.minor}",
                        "cuda": torch.version.cuda}
    except Exception as exc:  # noqa: BLE001  (a broken CUDA install must not stop a CPU run)
        log.debug("torch sees no usable GPU: %s", exc)
    rt = _cudart()
    if rt is not None:
        try:
            err, _free, total = rt.cudaMemGetInfo()
            err2, props = rt.cudaGetDeviceProperties(0)
            name = props.name.decode(errors="replace").strip("\0") if int(err2) == 0 else None
            return {"name": name, "memory_bytes": int(total)} if int(err) == 0 else None
        except Exception as exc:  # noqa: BLE001  (as above)
            log.debug("cuda-python sees no usable GPU: %s", exc)
            return None
    return None


def _cudart():
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt
        except ImportError:
            return None
    return rt


class DeviceMemoryPeak:
    """Peak device memory in use while active, sampled from cudaMemGetInfo in a thread
    (device-wide, above the level at start; on a Jetson this is the shared DRAM).
    `peak_bytes` is None when no CUDA runtime is reachable."""

    def __init__(self, interval_s: float = 0.005):
        self.interval = interval_s
        self.rt = _cudart()
        self.peak_bytes = None
        self._base = None

    def _used(self) -> int | None:
        try:
            err, free, total = self.rt.cudaMemGetInfo()
            return int(total) - int(free) if int(err) == 0 else None
        except Exception:  # noqa: BLE001  (a sample lost is not worth a failed run)
            return None

    def __enter__(self):
        import threading
        if self.rt is None:
            return self
        self._base = self._used()
        if self._base is None:
            return self
        self.peak_bytes = 0
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(self.interval):
                used = self._used()
                if used is not None:
                    self.peak_bytes = max(self.peak_bytes, used - self._base)
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._base is not None:
            self._stop.set()
            self._thread.join()
            used = self._used()
            if used is not None:
                self.peak_bytes = max(self.peak_bytes, used - self._base)
        return False


def matmul_rate(threads: int, n: int = 2048, repeats: int = 5) -> dict:
    """Float32 matrix-multiply rate (GFLOP/s, best of `repeats`) of torch with
    `threads` threads and of numpy (its BLAS threads as configured)."""
    out = {"n": n, "flops": 2 * n ** 3}
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    out["numpy_gflops"] = 2 * n ** 3 / best / 1e9
    if importlib.util.find_spec("torch") is not None:
        import torch
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        try:
            best = min(_timed(lambda: torch.mm(ta, tb)) for _ in range(repeats))
        finally:
            torch.set_num_threads(before)
        out["torch_gflops"] = 2 * n ** 3 / best / 1e9
        out["torch_threads"] = threads
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- inputs

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

def _parse_variant(spec: str) -> tuple[str, dict]:
    """'onnx:arena=1+roles=grata' -> ('onnx', {'arena': '1', 'roles': 'grata'})."""
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split("+")):
        key, eq, value = item.partition("=")
        if not eq:
            raise GrataError(f"backend option {item!r} in {spec!r} is not key=value")
        opts[key.strip()] = value.strip()
    return name, opts


ONNX_OPTIONS = {
    "arena": "CPU memory arena: off (0, the runtime's choice), one per session (1), or "
             "shared (one arena for all sessions, growing by what is asked)",
    "opt": "graph optimisation level: disable, basic, extended, all (the runtime's choice)",
    "roles": "sessions created: all graphs (the runtime), or grata (the three GraTa graphs)",
    "spin": "intra-op threads spin after a run (1, onnxruntime's default) or sleep (0)",
    "pool": "thread pools: session (one per session, the runtime's) or global (one for "
            "the process; set before its first session)",
    "threads": "intra-op threads of this variant",
    "share": "1: the frozen weights read once and handed to every session as shared "
             "initializers (add_initializer) instead of one copy per session",
}


def shared_initializers(folder: Path, graph_files) -> dict:
    """{tensor name: numpy array} of every external-data initializer of the graphs, read
    once from the weights file (the graphs reference the same bytes by name)."""
    import onnx
    from onnx import helper
    arrays: dict[str, np.ndarray] = {}
    blobs: dict[str, np.ndarray] = {}
    for f in graph_files:
        model = onnx.load(str(folder / f), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL or t.name in arrays:
                continue
            info = {e.key: e.value for e in t.external_data}
            loc = info["location"]
            if loc not in blobs:
                blobs[loc] = np.fromfile(folder / loc, dtype=np.uint8)
            start, length = int(info.get("offset", 0)), int(info["length"])
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            arrays[t.name] = blobs[loc][start:start + length].view(dtype).reshape(tuple(t.dims))
    return arrays


def provider_list(device: str, precision: str, cache_dir: Path | None = None) -> list:
    """onnxruntime providers (with options) for a device and precision."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "tensorrt":
        opts = {"trt_fp16_enable": precision in ("fp16", "int8"),
                "trt_int8_enable": precision == "int8"}
        if cache_dir is not None:
            opts.update({"trt_engine_cache_enable": True,
                         "trt_engine_cache_path": str(cache_dir),
                         "trt_timing_cache_enable": True,
                         "trt_timing_cache_path": str(cache_dir)})
        return [("TensorrtExecutionProvider", opts), "CUDAExecutionProvider",
                "CPUExecutionProvider"]
    raise GrataError(f"unknown device {device!r}")


def _copy_options(opts):
    """A fresh SessionOptions with the same settings (initializers are per options)."""
    import onnxruntime as ort
    new = ort.SessionOptions()
    for attr in ("graph_optimization_level", "execution_mode", "intra_op_num_threads",
                 "inter_op_num_threads", "enable_cpu_mem_arena", "enable_mem_pattern",
                 "use_per_session_threads"):
        setattr(new, attr, getattr(opts, attr))
    for key in ("session.intra_op.allow_spinning", "session.use_env_allocators"):
        value = opts.get_session_config_entry(key) if _has_entry(opts, key) else None
        if value is not None:
            new.add_session_config_entry(key, value)
    return new


def _has_entry(opts, key: str) -> bool:
    try:
        opts.get_session_config_entry(key)
    except Exception:  # noqa: BLE001  (onnxruntime raises a bare RuntimeError when unset)
        return False
    return True


def make_onnx_engine(artifacts, device: str = "cpu", precision: str = "fp32",
                     threads: int | None = None, options: dict | None = None,
                     cache_dir: Path | None = None):
    """The runtime's engine when nothing is changed (`open_engine`: OrtEngine on a CPU,
    CudaEngine with device arrays on CUDA); otherwise an OrtEngine whose
    sessions get the given provider options (TensorRT precision flags) and session
    settings (see ONNX_OPTIONS), which the runtime's device names do not carry."""
    import onnxruntime as ort

    from .export.manifest import load_manifest
    from .export.session import session_options
    from .runtime import OrtEngine, open_engine

    options = dict(options or {})
    unknown = sorted(set(options) - set(ONNX_OPTIONS))
    if unknown:
        raise GrataError(f"unknown onnx option {unknown[0]!r}; choose from "
                         f"{', '.join(ONNX_OPTIONS)}")
    if not options and device in ("cpu", "cuda"):  # what grata adapt runs
        if device == "cuda" and importlib.util.find_spec("cupy") is None:
            # CudaEngine keeps its arrays in CuPy; without it, the CUDA provider with
            # host arrays (the report's "engine" field says which ran)
            return OrtEngine(artifacts, device="cuda", threads=threads)
        return open_engine(artifacts, device=device, threads=threads)

    providers = provider_list(device, precision, cache_dir)
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if wanted not in ort.get_available_providers():
        raise GrataError(f"this onnxruntime lacks {wanted}")
    if options.get("pool") == "global":
        from onnxruntime.capi import _pybind_state as C
        C.set_global_thread_pool_sizes(int(options.get("threads") or threads or 0), 1)
    opts = session_options(int(options.get("threads") or 0) or threads)
    if options.get("arena") == "shared":
        # one arena in onnxruntime's environment, used by every session of the process
        mem = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(
            mem, ort.OrtArenaCfg({"arena_extend_strategy": 1}))  # kSameAsRequested
        opts.enable_cpu_mem_arena = True
        opts.add_session_config_entry("session.use_env_allocators", "1")
    elif "arena" in options:
        if options["arena"] not in ("0", "1"):
            raise GrataError(f"arena={options['arena']}: choose 0, 1 or shared")
        opts.enable_cpu_mem_arena = opts.enable_mem_pattern = options["arena"] == "1"
    if "opt" in options:
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if options["opt"] not in levels:
            raise GrataError(f"opt={options['opt']}: choose from {', '.join(levels)}")
        opts.graph_optimization_level = levels[options["opt"]]
    if "spin" in options:
        opts.add_session_config_entry("session.intra_op.allow_spinning", options["spin"])
    if options.get("pool") == "global":
        opts.use_per_session_threads = False
    roles = options.get("roles", "all")
    if roles not in ("all", "grata"):
        raise GrataError(f"roles={roles}: choose all or grata")

    class _Engine(OrtEngine):
        def __init__(self):  # OrtEngine's attributes, sessions built here
            self.folder = Path(artifacts)
            self.manifest = m = load_manifest(self.folder)
            self.size = int(m["size"])
            self.layout = m["params"]
            self.theta0 = np.load(self.folder / m["theta0"]).astype(np.float32)
            self.theta = self.theta0.copy()
            self.dtype = np.float32
            # (the mixed-statistics graphs open on first use in the runtime too)
            keep = {r: f for r, f in m["graphs"].items() if not r.endswith("_mix")
                    and (roles == "all" or r != "infer_source")}
            self.sessions = {}
            self._shared = None
            if options.get("share") == "1":  # kept alive as long as the sessions
                arrays = shared_initializers(self.folder, keep.values())
                self._shared = {k: ort.OrtValue.ortvalue_from_numpy(v)
                                for k, v in arrays.items()}
            for r, f in keep.items():
                role_opts = opts
                if self._shared is not None:
                    import onnx
                    role_opts = _copy_options(opts)
                    names = {t.name for t in onnx.load(str(self.folder / f),
                                                       load_external_data=False
                                                       ).graph.initializer}
                    for name in names & set(self._shared):
                        role_opts.add_initializer(name, self._shared[name])
                self.sessions[r] = ort.InferenceSession(str(self.folder / f),
                                                        sess_options=role_opts,
                                                        providers=providers)

    return _Engine()


# ----------------------------------------------------------------------------- workers

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
    from .kernels import grata_update
    from .methods import create

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

            from .models import ResUnet, load_checkpoint
            from .torch_engine import TorchEngine
            if threads:
                torch.set_num_threads(threads)
            if spec.get("checkpoint"):
                model = load_checkpoint(spec["checkpoint"], spec["arch"])
            else:
                torch.manual_seed(seed)
                model = ResUnet(spec["arch"])
            engine = TorchEngine(model, device="cuda" if backend == "torch-cuda" else "cpu")
        size = getattr(engine, "size", size)
        sync = _sync_for(backend, engine)
        rss_setup = rss_bytes()
        rng = np.random.default_rng(seed)
        images = [bench_image(i, size) for i in range(4)]
        from .augment import strong_augment
        x = engine.to_input(images[0])
        strong = engine.to_input(strong_augment(images[0], rng))
        method = create("grata", engine, seed=seed)
        counter = {"i": 0}

        def full():
            img = images[counter["i"] % len(images)]
            counter["i"] += 1
            method.adapt(engine.to_input(img), image=img)

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
        stages = {}
        for name in spec["stages"]:
            times = measure(fns[name], spec["warmup"], spec.get("iterations"),
                            spec.get("duration"), sync=sync)
            stages[name] = summarize(times)
    out = {"stages": stages, "size": size, "engine": type(engine).__name__,
           "memory": {"rss_start_bytes": rss0, "rss_after_setup_bytes": rss_setup,
                      "peak_rss_bytes": peak_rss_bytes(),
                      "device_peak_bytes": device_peak.peak_bytes}}
    if backend == "torch-cuda":
        import torch
        out["memory"]["torch_cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def _adapt_worker(spec: dict) -> dict:
    """Per-image GraTa cost of one backend on one (arch, size). Own process."""
    backend, options = _parse_variant(spec["backend"])
    size, seed, threads = spec["size"], spec["seed"], spec["threads"]
    rss0 = rss_bytes()
    if backend == "onnx":
        from .methods import create
        engine = make_onnx_engine(spec["artifacts"], "cpu", "fp32", threads, options)
        method = create("grata", engine, seed=seed)

        def step(img):
            return method.adapt(engine.to_input(img), image=img)
    elif backend in ("torch-ref", "torch"):
        import torch

        from .models import ResUnet
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        model = ResUnet(spec["arch"])
        if backend == "torch-ref":
            from .bench_reference import AuthorsGraTa
            ref = AuthorsGraTa(model, seed=seed)

            def step(img):
                return ref.adapt(img)
        else:
            from .methods import create
            method = create("grata", model, seed=seed)

            def step(img):
                return method.adapt(method.engine.to_input(img), image=img)
    else:
        raise GrataError(f"unknown backend {backend!r}; choose from {', '.join(ADAPT_BACKENDS)}")
    rss_setup = rss_bytes()
    times = []
    for i in range(spec["warmup"] + spec["images"]):
        img = bench_image(i, size)
        t0 = time.perf_counter()
        step(img)
        dt = time.perf_counter() - t0
        if i >= spec["warmup"]:
            times.append(dt)
    return {"per_image": summarize(times), "times_s": times,
            "memory": {"rss_start_bytes": rss0, "rss_after_setup_bytes": rss_setup,
                       "peak_rss_bytes": peak_rss_bytes()},
            "torch_imported": "torch" in sys.modules}


WORKERS = {"stages": _stage_worker, "adapt": _adapt_worker}


def _worker_main(argv: list[str]) -> int:
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


# ----------------------------------------------------------------------------- artifacts

def _random_model_artifacts(arch: str, size: int, seed: int, quiet: bool = True) -> Path:
    """Artifacts of a randomly initialised ResUnet (torch.manual_seed(seed)), exported
    once into the cache: timing does not depend on the weights."""
    from . import defaults
    folder = defaults.cache_dir() / "bench" / f"{arch}-{size}-seed{seed}"
    if (folder / "manifest.json").exists():
        return folder
    try:
        import torch

        from .export import export_artifacts
        from .models import ResUnet
    except ImportError:
        raise GrataError("exporting a model needs torch: pip install 'grata-edge[export]', "
                         "or pass --artifacts DIR") from None
    if not quiet:
        print(f"exporting a random {arch} at {size}x{size} to {folder} (once)", file=sys.stderr)
    torch.manual_seed(seed)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    export_artifacts(ResUnet(arch), arch, size, tmp)
    try:
        tmp.rename(folder)
    except OSError:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _default_artifacts(size: int | None, quiet: bool) -> tuple[Path, str]:
    """The embedded default: the shipped checkpoint exported at the default size, or a
    random edge model when the checkpoint is not there."""
    from . import defaults
    size = size or defaults.DEFAULT_SIZE
    ckpt = defaults.checkpoint()
    if Path(ckpt).is_file():
        from .cli import _cached_artifacts
        return _cached_artifacts(ckpt, defaults.DEFAULT_ARCH, size, quiet), \
            f"shipped checkpoint {Path(ckpt).name}"
    return _random_model_artifacts(defaults.DEFAULT_ARCH, size, 0, quiet), \
        "random weights (seed 0; the shipped checkpoint is absent)"


def _int8_artifacts(fp32: Path, quiet: bool) -> Path:
    """A QDQ INT8 copy of fp32 artifacts (calibrated on 16 synthetic source images),
    made once into the cache. Good enough for timing; `grata calibrate` makes the one
    to ship and scores it."""
    from . import defaults
    from .calibration.quantize import quantize_artifacts
    from .export.manifest import load_manifest
    from .synth import SOURCE_DOMAIN
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
    from . import defaults
    from .calibration.quantize import convert_fp16
    from .export.manifest import load_manifest
    m = load_manifest(fp32, verify=False)
    folder = defaults.cache_dir() / "bench" / f"fp16-{m['manifest_sha256'][:16]}"
    if not (folder / "manifest.json").exists():
        if not quiet:
            print(f"converting to FP16 into {folder} (once)", file=sys.stderr)
        convert_fp16(fp32, folder)
    return folder


# ----------------------------------------------------------------------------- suites

def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _available_backends() -> list[str]:
    out = []
    try:
        import onnxruntime as ort
        have = ort.get_available_providers()
        out.append("onnx-cpu")
        if "CUDAExecutionProvider" in have:
            out.append("onnx-cuda")
        if "TensorrtExecutionProvider" in have:
            out.append("onnx-tensorrt")
    except ImportError:
        pass
    if importlib.util.find_spec("torch") is not None:
        out.append("torch-cpu")
        try:
            import torch
            if torch.cuda.is_available():
                out.append("torch-cuda")
        except Exception as exc:  # noqa: BLE001  (as in gpu_info)
            log.debug("torch sees no usable GPU: %s", exc)
    return out


def _mb(x) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def _rate(x) -> str:
    return "-" if x is None else f"{x / 1e3:.0f}k" if x >= 1e4 else f"{x:.1f}"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f}" if x < 100 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


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
    from .export.manifest import load_manifest
    quiet = args.quiet
    if args.artifacts is not None:
        fp32, weights = args.artifacts, f"artifacts {args.artifacts}"
    else:
        fp32, weights = _default_artifacts(args.size, quiet)
    m = load_manifest(fp32)
    if m.get("precision", {}).get("infer", "fp32") != "fp32":
        raise GrataError(f"--artifacts {fp32} is not float32; pass the float32 folder and "
                         f"the quantised one with --int8")
    backends = _csv(args.backends) if args.backends != "auto" else _available_backends()
    precisions = None if args.precisions == "auto" else _csv(args.precisions)
    stages = _csv(args.stages)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise GrataError(f"unknown stage {bad[0]!r}; choose from {', '.join(STAGES)}")
    plan = stages_plan(backends, precisions)
    threads = args.threads
    if threads is None:
        from .export.session import default_threads
        threads = default_threads()
    settings = {"suite": "stages", "artifacts": str(fp32), "weights": weights,
                "arch": m["arch"], "size": m["size"], "stages": stages, "warmup": args.warmup,
                "iterations": None if args.duration else args.iterations,
                "duration_s": args.duration, "threads": threads, "seed": args.seed,
                "malloc": {"setting": args.malloc, **MALLOC_SETTINGS[args.malloc]},
                "checkpoint": str(args.checkpoint) if args.checkpoint else None}
    from . import defaults
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
                "duration": args.duration,
                "cache": str(defaults.cache_dir() / "trt-ep")}
        if not quiet:
            print(f"  {backend} {precision} ...", file=sys.stderr, flush=True)
        result = run_worker(spec, args.malloc, timeout=args.timeout)
        rows.append({**row, "artifacts": str(folder), **result})
    return {"format_version": FORMAT_VERSION, "suite": "stages", "machine": machine_info(),
            "gpu": gpu_info(), "versions": versions(), "settings": settings, "results": rows}


def format_stages(report: dict) -> str:
    s = report["settings"]
    lines = [_header(report, f"{s['arch']} {s['size']}x{s['size']}, warm-up {s['warmup']}, "
                     + (f"{s['duration_s']} s per stage" if s["duration_s"]
                        else f"{s['iterations']} iterations") + f", {s['threads']} threads")]
    head = (f"{'backend':14} {'prec':5} {'stage':17} {'min':>8} {'mean':>8} {'median':>8} "
            f"{'p90':>8} {'p99':>8} {'1/s':>7} {'peakRSS':>8} {'devMB':>6}")
    lines += [head + "   (ms; memory MiB)", "-" * len(head)]
    for r in report["results"]:
        tag = f"{r['backend']:14} {r['precision']:5}"
        if r.get("skipped") or r.get("error"):
            lines.append(f"{tag} {'skipped: ' + r['skipped'] if r.get('skipped') else 'error: ' + r['error']}")
            continue
        mem = r["memory"]
        for k, (name, st) in enumerate(r["stages"].items()):
            tput = st["throughput_per_s"]
            lines.append(
                f"{tag if k == 0 else ' ' * len(tag)} {name:17} {_ms(st['min_ms']):>8} "
                f"{_ms(st['mean_ms']):>8} {_ms(st['median_ms']):>8} {_ms(st['p90_ms']):>8} "
                f"{_ms(st['p99_ms']):>8} {_rate(tput):>7} "
                f"{_mb(mem['peak_rss_bytes']) if k == 0 else '':>8} "
                f"{_mb(mem.get('device_peak_bytes')) if k == 0 else '':>6}")
    return "\n".join(lines)


def _header(report: dict, what: str) -> str:
    m, v = report["machine"], report["versions"]
    gpu = report.get("gpu")
    load = m.get("load_average")
    parts = [f"grata bench {report['suite']}: {what}",
             (f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs, {m['physical_cores']} "
              f"cores{', ' + m['board'] if m.get('board') else ''}), "
              f"{_mb(m['memory_bytes'])} MiB RAM, {m['platform']}"),
             f"gpu: {gpu['name'] if gpu else 'none'}; load average at start: "
             + (" ".join(f"{x:.2f}" for x in load) if load else "n/a"),
             "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()
                                      if k != "onnxruntime_providers"),
             f"date: {m['date_utc']}"]
    return "\n".join(parts)


def run_adapt(args) -> dict:
    import torch  # the reference, FLOP counts and the exports need it

    from .models import ResUnet, flops

    archs, sizes = _csv(args.archs), [int(s) for s in _csv(args.sizes)]
    backends = _csv(args.backends)
    for b in backends:
        name, opts = _parse_variant(b)
        if name not in ADAPT_BACKENDS:
            raise GrataError(f"unknown backend {name!r}; choose from {', '.join(ADAPT_BACKENDS)}")
        if opts and name != "onnx":
            raise GrataError(f"{b}: options apply to the onnx backend only")
    threads = args.threads
    if threads is None:
        from .export.session import default_threads
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
                                    "(9 forwards + 2 backwards at 2 forwards each)"}
    rows = []
    for arch in archs:
        for size in sizes:
            if size % 32 or size < 64:
                raise GrataError(f"size {size}: use a multiple of 32, at least 64")
            torch.manual_seed(args.seed)
            forward = flops(ResUnet(arch), size)
            folder = None
            if any(_parse_variant(b)[0] == "onnx" for b in backends):
                folder = _random_model_artifacts(arch, size, args.seed, args.quiet)
            for backend in backends:
                spec = {"suite": "adapt", "backend": backend, "arch": arch, "size": size,
                        "artifacts": str(folder) if folder else None, "seed": args.seed,
                        "threads": threads, "images": args.images, "warmup": args.warmup}
                if not args.quiet:
                    print(f"  {arch} {size} {backend} ...", file=sys.stderr, flush=True)
                result = run_worker(spec, args.malloc, timeout=args.timeout)
                row = {"arch": arch, "size": size, "backend": backend,
                       "forward_flops": forward,
                       "flops_per_image": FORWARDS_PER_IMAGE * forward, **result}
                if not result.get("error"):
                    med = result["per_image"]["median_ms"] / 1e3
                    row["gflops_per_s"] = row["flops_per_image"] / med / 1e9
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


def format_adapt(report: dict) -> str:
    s, mm = report["settings"], report["matmul"]
    lines = [_header(report, f"GraTa per image, {s['images']} images after {s['warmup']} "
                             f"warm-up, {s['threads']} threads"),
             f"float32 matmul {mm['n']}x{mm['n']}: "
             + (f"torch {mm['torch_gflops']:.0f} GFLOP/s, " if "torch_gflops" in mm else "")
             + f"numpy {mm['numpy_gflops']:.0f} GFLOP/s; FLOPs/image = "
             f"{FORWARDS_PER_IMAGE} x forward"]
    head = (f"{'arch':9} {'size':>4} {'backend':26} {'median s':>9} {'p90 s':>7} "
            f"{'min s':>7} {'peakRSS':>8} {'GFLOP/img':>9} {'GFLOP/s':>8} {'time/ref':>8} "
            f"{'RSS/ref':>7}")
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        tag = f"{r['arch']:9} {r['size']:>4} {r['backend'][:26]:26}"
        if r.get("error"):
            lines.append(f"{tag} error: {r['error']}")
            continue
        st = r["per_image"]
        ratio = r.get("time_vs_torch_ref")
        mem = r.get("peak_rss_vs_torch_ref")
        lines.append(f"{tag} {st['median_ms'] / 1e3:9.3f} {st['p90_ms'] / 1e3:7.3f} "
                     f"{st['min_ms'] / 1e3:7.3f} {_mb(r['memory']['peak_rss_bytes']):>8} "
                     f"{r['flops_per_image'] / 1e9:9.1f} {r['gflops_per_s']:8.1f} "
                     f"{'-' if ratio is None else f'{ratio:.2f}x':>8} "
                     f"{'-' if mem is None else f'{mem:.2f}x':>7}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

EPILOG = """\
suites:
  grata bench [stages]   latency of predict / entropy_grad / consistency_grad / update /
                         the full GraTa image, per backend and precision
  grata bench adapt      per-image GraTa cost, onnx runtime vs the PyTorch reference in
                         the authors' structure, with peak memory and FLOP rates

examples:
  grata bench                                   the embedded default model, every backend
                                                this machine has, fp32 and int8
  grata bench --backends onnx-tensorrt,onnx-cuda --precisions fp32,fp16,int8 \\
      --artifacts art/edge256 --int8 runs/int8/int8 --duration 10
  grata bench adapt --archs resnet34,edge --sizes 256,512 --images 10
  grata bench adapt --archs edge --sizes 256 --images 3 --warmup 1     (a quick look)
  grata bench adapt --backends onnx,onnx:arena=1,onnx:roles=grata+share=1,torch-ref
      onnx session variants: """ + "; ".join(f"{k}: {v}" for k, v in ONNX_OPTIONS.items()) + """

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
    b.add_argument("--stages", default=",".join(STAGES), help="stages: which (default all)")
    b.add_argument("--archs", default="resnet34,edge", help="adapt: archs (resnet34,edge)")
    b.add_argument("--sizes", default="256,512", help="adapt: input sizes (256,512)")
    b.add_argument("--images", type=int, default=10, help="adapt: timed images (10)")
    b.add_argument("--matmul", type=int, default=2048,
                   help="adapt: matrix size of the float32 matmul rate (2048)")
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
    from .report import write_json_atomic
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


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    from .cli import main
    sys.exit(main(["bench", *sys.argv[1:]]))

"""onnxruntime in one place: the importer, providers per device, session settings and
their tuned variants, and opening an artifact folder's sessions (torch-free).

The engines (`OrtEngine`, `CudaEngine`), the predictors and `grata bench` all open their
sessions through this module, so a setting changed here changes it everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from grata.errors import GrataError
from grata.runtime.heap import keep_heap

# device -> onnxruntime execution providers, in the order tried
PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                          "CPUExecutionProvider"]}
# How an engine's sessions are built (`engine_sessions`), key -> what it does; a caller
# (grata bench) may change any of them. The defaults were chosen by measurement against
# the PyTorch reference (BENCHMARKS.md, `grata bench adapt`).
TUNING = {
    "share": "1 (default): the frozen weights mapped once from the weights file and handed "
             "to every session (add_initializer); 0: each session reads its own copy",
    "gradopt": "optimisation level of the gradient graphs: extended (default; no NCHWc "
               "layout transform, whose reordered copy of every kernel would sit beside the "
               "shared original), or as opt",
    "opt": "optimisation level of the forward graphs: disable, basic, extended "
           "(default: no NCHWc copy of the kernels beside the shared ones; a standalone "
           "predictor runs the same, bit for bit), all",
    "arena": "CPU memory arena: off (0, default), one per session (1), or shared (one "
             "arena for all sessions of the process, growing by what is asked)",
    "spin": "intra-op threads after a run: stop (default; they do not compete with the "
            "next graph's), 1 (onnxruntime's spinning), 0 (never spin)",
    "pool": "thread pools: session (one per session, default) or global (one for the "
            "process; every later session of the process must use it too)",
    "threads": "intra-op threads",
    "profile": "a file-name prefix: onnxruntime's per-node profile of every session "
               "(end_profiling writes it; off by default)",
    "order": "node order: priority (default; onnxruntime's priority-based topological "
             "order) or default (its plain one); the same peak within run-to-run noise "
             "since the exported graphs order their backward themselves",
    "heap": "keep (default): glibc keeps freed memory in the process heap for the next "
            "image instead of mapping and faulting large buffers afresh on every graph "
            "(grata.runtime.heap); system: glibc's own thresholds",
}
# Why these (measured, ResNet-34 at 512x512, BENCHMARKS.md): shared weights save one copy
# of the frozen tensors per session; NCHWc's reordered kernels cost ~70-350 MiB per
# gradient graph, and ~80 MiB in the forward graph (ResNet-34 at 512: peak RSS 1.05x the
# torch reference with it, 0.98x without), for ~7 % on the convolutions alone and 0-7 % on
# whole images; the shared arena is 10-20 % faster at 512 but adds ~100-155 MiB peak (memory
# first); keeping the heap gives the arena's speed without its peak (no page faults after
# the first image: ResNet-34 512x512, two threads, 2.36 -> 1.98 s, peak 933 -> 976 MiB);
# spinning threads of the graph that just finished compete with the next graph's on few
# cores, and the global pool that would avoid it binds every session of the process. The
# node order measured the same either way once the export orders the backward (973-996
# MiB); priority is kept, an earlier graph layout held 1053 MiB under the default order.
ENGINE_DEFAULTS = {"share": "1", "gradopt": "extended", "opt": "extended", "arena": "0",
                   "spin": "stop", "pool": "session", "order": "priority",
                   "heap": "keep"}
# the roles an engine opens at once (start-up paid there, not on the first image); the
# others (infer_source, the mixed graphs) open on first use
EAGER_ROLES = ("infer", "entropy_grad", "consistency_grad")
_PROCESS: dict = {}  # set up once per process: the shared arena, the global pool


def import_onnxruntime():
    """The onnxruntime module, or a one-line `GrataError` naming the extra to install."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise GrataError("this needs onnxruntime, which is not installed: pip install "
                         "'grata-edge[device]'") from None
    return ort


def available_providers() -> list[str]:
    """onnxruntime's execution providers here ([] without onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads not counted)."""
    try:
        allowed = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    for cpu in allowed:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "physical_package_id") as f:
                pkg = f.read().strip()
            with open(base + "core_id") as f:
                core = f.read().strip()
        except OSError:
            return max(1, len(allowed))
        cores.add((pkg, core))
    return max(1, len(cores) or len(allowed))


def _cgroup_cpus() -> int | None:
    """CPUs granted by a cgroup v2 quota (containers), if any."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, -(-int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def default_threads() -> int:
    """Intra-op threads for the graphs: the physical cores, capped by a CPU quota."""
    quota = _cgroup_cpus()
    cores = physical_cores()
    return min(cores, quota) if quota else cores


def session_options(threads: int | None = None):
    """`onnxruntime.SessionOptions` for the artifact graphs: all graph optimisations,
    `threads` intra-op threads (default: `default_threads`, the physical cores), one
    inter-op thread, sequential execution, and the CPU memory arena and memory pattern
    off (about half the peak memory of the gradient graphs at no cost in speed)."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = int(threads) if threads else default_threads()
    opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    return opts


# What a CUDA provider computes float32 work in: onnxruntime's CUDA provider may use
# TensorFloat-32 (10-bit mantissa) in its convolutions and matrix products when
# `use_tf32` is unset, so "fp32" sets it to "0" and only "tf32" turns it on.
COMPUTE_PRECISIONS = ("fp32", "tf32", "fp16", "int8")


def cuda_options(precision: str = "fp32", **extra) -> dict:
    """CUDA execution provider options for `precision`: TF32 only when it is "tf32"."""
    return {**{k: str(v) for k, v in extra.items()},
            "use_tf32": "1" if precision == "tf32" else "0"}


def provider_list(device: str, precision: str = "fp32", cache_dir: Path | None = None) -> list:
    """onnxruntime providers (with options) for a device and precision; checks that this
    onnxruntime has the first one. The CUDA provider always gets explicit options
    (`cuda_options`): TF32 off unless `precision` is "tf32", which needs a GPU device."""
    if device not in PROVIDERS:
        raise GrataError(f"unknown device {device!r}; choose from {', '.join(PROVIDERS)}")
    if precision not in COMPUTE_PRECISIONS:
        raise GrataError(f"unknown precision {precision!r}; choose from "
                         f"{', '.join(COMPUTE_PRECISIONS)}")
    if precision == "tf32" and device == "cpu":
        raise GrataError("precision 'tf32' is a GPU math mode; use --device cuda (or fp32)")
    providers: list = list(PROVIDERS[device])
    if "CUDAExecutionProvider" in providers:
        i = providers.index("CUDAExecutionProvider")
        providers[i] = ("CUDAExecutionProvider", cuda_options(precision))
    if device == "tensorrt":
        # The TensorRT provider has no TF32 switch of its own; its float32 layers follow
        # TensorRT's builder default (grata.runtime.tensorrt clears TF32 for fp32).
        opts = {"trt_fp16_enable": precision in ("fp16", "int8"),
                "trt_int8_enable": precision == "int8"}
        if cache_dir is not None:
            opts.update({"trt_engine_cache_enable": True,
                         "trt_engine_cache_path": str(cache_dir),
                         "trt_timing_cache_enable": True,
                         "trt_timing_cache_path": str(cache_dir)})
        providers[0] = ("TensorrtExecutionProvider", opts)
    have = import_onnxruntime().get_available_providers()
    if PROVIDERS[device][0] not in have:
        raise GrataError(f"device {device!r} needs onnxruntime's {PROVIDERS[device][0]}, "
                         f"which this onnxruntime lacks (has: {', '.join(have)})")
    return providers


_LEVELS = ("disable", "basic", "extended", "all")


def _choice(tuning: dict, key: str, allowed) -> str:
    value = tuning[key]
    if value not in allowed:
        raise GrataError(f"{key}={value}: choose from {', '.join(allowed)}")
    return value


def tuned_options(threads: int | None, tuning: dict | None = None):
    """(options for a role, share) for the engine settings `ENGINE_DEFAULTS` changed by
    `tuning` (keys of TUNING): a function giving each role's SessionOptions (one object
    per kind of graph, forward or gradient), and whether the weights are shared."""
    ort = import_onnxruntime()
    tuning = dict(tuning or {})
    unknown = sorted(set(tuning) - set(TUNING))
    if unknown:
        raise GrataError(f"unknown onnx option {unknown[0]!r}; choose from "
                         f"{', '.join(TUNING)}")
    t = {**ENGINE_DEFAULTS, **tuning}
    g = ort.GraphOptimizationLevel
    levels = {"disable": g.ORT_DISABLE_ALL, "basic": g.ORT_ENABLE_BASIC,
              "extended": g.ORT_ENABLE_EXTENDED, "all": g.ORT_ENABLE_ALL}
    level = {False: levels[_choice(t, "opt", _LEVELS)],
             True: levels[_choice(t, "gradopt", _LEVELS)]}
    arena = _choice(t, "arena", ("0", "1", "shared"))
    spin = _choice(t, "spin", ("stop", "1", "0"))
    pool = _choice(t, "pool", ("session", "global"))
    share = _choice(t, "share", ("0", "1")) == "1"
    order = {"priority": ort.ExecutionOrder.PRIORITY_BASED,
             "default": ort.ExecutionOrder.DEFAULT}[_choice(t, "order", ("priority", "default"))]
    if _choice(t, "heap", ("keep", "system")) == "keep":
        keep_heap()
    n = int(t.get("threads") or 0) or threads
    profile = t.get("profile")
    if pool == "global" and "pool" not in _PROCESS:
        from onnxruntime.capi import _pybind_state as C
        C.set_global_thread_pool_sizes(int(n or default_threads()), 1)
        _PROCESS["pool"] = True
    if arena == "shared" and "arena" not in _PROCESS:
        # one arena in onnxruntime's environment, used by every session that asks for it
        mem = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(
            mem, ort.OrtArenaCfg({"arena_extend_strategy": 1}))  # kSameAsRequested
        _PROCESS["arena"] = True
    made: dict = {}

    def options(grad: bool):
        if grad not in made:
            opts = made[grad] = session_options(n)
            opts.graph_optimization_level = level[grad]
            opts.execution_order = order
            if arena == "shared":
                opts.enable_cpu_mem_arena = True
                opts.add_session_config_entry("session.use_env_allocators", "1")
            elif arena == "1":
                opts.enable_cpu_mem_arena = opts.enable_mem_pattern = True
            if spin == "stop":
                opts.add_session_config_entry("session.force_spinning_stop", "1")
            else:
                opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
            if pool == "global":
                opts.use_per_session_threads = False
            if profile:
                opts.enable_profiling = True
                opts.profile_file_prefix = f"{profile}-{'grad' if grad else 'fwd'}"
        return made[grad]
    return options, share


def shared_weights(folder: Path, manifest: dict) -> dict | None:
    """{name: OrtValue} of every frozen tensor, over one read-only mapping of the weights
    file (the manifest's `weights_index`); None for folders exported without the index
    or with one the file does not match (then each session reads the file itself)."""
    ort = import_onnxruntime()
    index, weights = manifest.get("weights_index"), manifest.get("weights")
    if not isinstance(index, dict) or not index or not weights:
        return None
    blob = np.memmap(Path(folder) / weights, dtype=np.uint8, mode="r")
    values = {}
    try:
        for name, e in index.items():
            count = int(np.prod([int(d) for d in e["shape"]], dtype=np.int64))
            start = int(e["offset"])
            if start < 0 or start % 4 or start + 4 * count > blob.size:
                return None  # not what the exporter writes
            array = blob[start:start + 4 * count].view(np.float32).reshape(e["shape"])
            values[name] = ort.OrtValue.ortvalue_from_numpy(array)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return values


def _is_gradient(manifest: dict, role: str) -> bool:
    io = manifest.get("io", {}).get(role)
    return "grad" in io["outputs"] if isinstance(io, dict) else "_grad" in role


class EngineSessions(Mapping):
    """role -> InferenceSession of an artifact folder, each made on first use (the GraTa
    method never opens ``infer_source``; the mixed graphs open when a rule needs them).
    Holds the shared weights the sessions read. `in` does not open a session."""

    def __init__(self, folder: Path, manifest: dict, options, providers: list,
                 weights: dict | None = None):
        """`options`: a function of the role giving its SessionOptions."""
        self.folder, self.manifest = Path(folder), manifest
        self.graphs = dict(manifest["graphs"])
        self.options, self.providers, self.weights = options, list(providers), weights
        self._made: dict = {}

    def __getitem__(self, role):
        if role not in self._made:
            if role not in self.graphs:
                raise KeyError(role)
            ort = import_onnxruntime()
            self._made[role] = ort.InferenceSession(
                str(self.folder / self.graphs[role]), sess_options=self.options(role),
                providers=self.providers)
        return self._made[role]

    def __contains__(self, role):
        return role in self.graphs

    def __iter__(self):
        return iter(self.graphs)

    def __len__(self):
        return len(self.graphs)

    def opened(self) -> dict:
        """{role: session} of the sessions made so far."""
        return dict(self._made)


def engine_sessions(folder: Path, manifest: dict, providers=("CPUExecutionProvider",),
                    threads: int | None = None, tuning: dict | None = None,
                    eager=EAGER_ROLES) -> EngineSessions:
    """The sessions of an artifact folder for one engine, the one place they are built.

    On the CPU provider: the settings `ENGINE_DEFAULTS` changed by `tuning` (frozen
    weights held once for all graphs, gradient graphs without NCHWc copies, threads that
    stop spinning after each run, no arena). On other providers every graph gets
    `session_options` alone. The `eager` roles open now, the others on first use."""
    providers = list(providers)
    first = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if first == "CPUExecutionProvider":
        by_kind, share = tuned_options(threads, tuning)
        weights = shared_weights(folder, manifest) if share else None

        given: set = set()  # options objects that hold the shared weights already

        def options(role):
            opts = by_kind(_is_gradient(manifest, role))
            if weights and id(opts) not in given:
                for name, value in weights.items():
                    opts.add_initializer(name, value)
                given.add(id(opts))
            return opts
    else:
        if tuning:
            raise GrataError(f"onnx options {sorted(tuning)} apply to the CPU provider only")
        plain, weights = session_options(threads), None

        def options(role):
            return plain
    sessions = EngineSessions(folder, manifest, options, providers, weights)
    for role in eager:
        if role in sessions:
            sessions[role]
    return sessions


__all__ = ["COMPUTE_PRECISIONS", "EAGER_ROLES", "ENGINE_DEFAULTS", "PROVIDERS", "TUNING",
           "EngineSessions", "available_providers", "cuda_options", "default_threads",
           "engine_sessions", "import_onnxruntime", "physical_cores", "provider_list",
           "session_options", "shared_weights", "tuned_options"]

"""onnxruntime in one place: the importer, providers per device, session settings and
their tuned variants, and opening an artifact folder's sessions (torch-free).

The engines (`OrtEngine`, `CudaEngine`), the predictors and `grata bench` all open their
sessions through this module, so a setting changed here changes it everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import GrataError

# device -> onnxruntime execution providers, in the order tried
PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                          "CPUExecutionProvider"]}
# session tuning a caller (grata bench) may ask for, key -> what it does
TUNING = {
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


def provider_list(device: str, precision: str = "fp32", cache_dir: Path | None = None) -> list:
    """onnxruntime providers (with options) for a device and precision; checks that this
    onnxruntime has the first one."""
    if device not in PROVIDERS:
        raise GrataError(f"unknown device {device!r}; choose from {', '.join(PROVIDERS)}")
    providers: list = list(PROVIDERS[device])
    if device == "tensorrt":
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


def tuned_options(threads: int | None, tuning: dict | None = None):
    """(SessionOptions, roles, share) for `tuning` (keys of TUNING; {} gives the runtime's
    own settings, all roles, no sharing)."""
    ort = import_onnxruntime()
    tuning = dict(tuning or {})
    unknown = sorted(set(tuning) - set(TUNING))
    if unknown:
        raise GrataError(f"unknown onnx option {unknown[0]!r}; choose from "
                         f"{', '.join(TUNING)}")
    if tuning.get("pool") == "global":
        from onnxruntime.capi import _pybind_state as C
        C.set_global_thread_pool_sizes(int(tuning.get("threads") or threads or 0), 1)
    opts = session_options(int(tuning.get("threads") or 0) or threads)
    if tuning.get("arena") == "shared":
        # one arena in onnxruntime's environment, used by every session of the process
        mem = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(
            mem, ort.OrtArenaCfg({"arena_extend_strategy": 1}))  # kSameAsRequested
        opts.enable_cpu_mem_arena = True
        opts.add_session_config_entry("session.use_env_allocators", "1")
    elif "arena" in tuning:
        if tuning["arena"] not in ("0", "1"):
            raise GrataError(f"arena={tuning['arena']}: choose 0, 1 or shared")
        opts.enable_cpu_mem_arena = opts.enable_mem_pattern = tuning["arena"] == "1"
    if "opt" in tuning:
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if tuning["opt"] not in levels:
            raise GrataError(f"opt={tuning['opt']}: choose from {', '.join(levels)}")
        opts.graph_optimization_level = levels[tuning["opt"]]
    if "spin" in tuning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", tuning["spin"])
    if tuning.get("pool") == "global":
        opts.use_per_session_threads = False
    roles = tuning.get("roles", "all")
    if roles not in ("all", "grata"):
        raise GrataError(f"roles={roles}: choose all or grata")
    return opts, roles, tuning.get("share") == "1"


def copy_options(opts):
    """A fresh SessionOptions with the same settings (initializers are per options)."""
    ort = import_onnxruntime()
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


def open_sessions(folder: Path, graphs: dict, providers: list, opts,
                  share: bool = False) -> tuple[dict, dict | None]:
    """{role: InferenceSession} for the graph files `graphs` ({role: file}) of an
    artifact folder, and the shared initializers (keep them alive as long as the
    sessions) when `share`."""
    ort = import_onnxruntime()
    shared = None
    if share:
        shared = {k: ort.OrtValue.ortvalue_from_numpy(v)
                  for k, v in shared_initializers(folder, graphs.values()).items()}
    sessions = {}
    for role, f in graphs.items():
        role_opts = opts
        if shared is not None:
            import onnx
            role_opts = copy_options(opts)
            names = {t.name for t in onnx.load(str(folder / f),
                                               load_external_data=False).graph.initializer}
            for name in names & set(shared):
                role_opts.add_initializer(name, shared[name])
        sessions[role] = ort.InferenceSession(str(folder / f), sess_options=role_opts,
                                              providers=providers)
    return sessions, shared


__all__ = ["PROVIDERS", "TUNING", "available_providers", "copy_options", "default_threads",
           "import_onnxruntime", "open_sessions", "physical_cores", "provider_list",
           "session_options", "shared_initializers", "tuned_options"]

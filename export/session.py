"""ONNX Runtime session settings for the exported graphs (torch-free)."""

from __future__ import annotations

import os


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
    inter-op thread,
    sequential execution, and the CPU memory arena and memory pattern off (about half
    the peak memory of the gradient graphs at no cost in speed)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = int(threads) if threads else default_threads()
    opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    return opts

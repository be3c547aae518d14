"""What a measurement ran on and what it used: machine, versions, GPU, memory, matmul rate."""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from grata import __version__
from grata.runtime.ort_session import available_providers, default_threads, physical_cores

try:
    import resource  # POSIX only: ru_maxrss where /proc is absent, minor faults
except ImportError:
    resource = None

log = logging.getLogger(__name__)


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
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    return kib * 1024


def minor_faults() -> int:
    """This process's minor page faults so far (pages the kernel mapped in on first
    touch: what a freshly mapped buffer costs)."""
    if resource is None:  # not on this OS
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


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
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """What the numbers were measured on (recorded in every report)."""
    info = {"platform": platform.platform(),
            "machine": platform.machine(), "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
            "default_threads": default_threads(), "memory_bytes": _mem_total(),
            "board": _device_model(), "load_average": list(os.getloadavg())
            if hasattr(os, "getloadavg") else None,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return info


def versions() -> dict:
    out = {"grata": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "tensorrt",
                "cuda-python", "scipy"):
        v = _version(pkg)
        if v is not None:
            out[pkg] = v
    if importlib.util.find_spec("onnxruntime") is not None:
        out["onnxruntime_providers"] = available_providers()
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


"""The CUDA path: ``grata_update.cu`` compiled at run time with NVRTC through cuda.core.

Needs the ``cuda-core`` / ``cuda-python`` packages (the ``gpu`` extra) and an NVRTC
library (``nvidia-cuda-nvrtc`` wheel or a CUDA toolkit). Importing this module does not
touch them; the first update does.

Arrays are anything with ``__cuda_array_interface__`` (torch CUDA tensors, CuPy arrays,
:class:`DeviceArray` wrappers of raw pointers, e.g. onnxruntime OrtValues): 1-D, contiguous,
float32, one device. Work is queued on a stream and the call returns without waiting,
except to read cos back when no ``cos_out`` buffer is given. The stream is, in order: the
``stream`` argument (an object with ``__cuda_stream__``, a cuda.core Stream, a torch
stream, or a raw handle int); torch's current stream on the arrays' device when they are
torch tensors; the ``stream`` entry of the arrays' interface; the legacy default stream.

Compiled code is cached on disk per device architecture:
``$GRATA_CACHE/kernels/sm_XY/<key>.cubin`` (default root ``~/.cache/grata``, or
``$XDG_CACHE_HOME/grata``), the key hashing the source, the compile options and the NVRTC
version. Cubin, not PTX: a cubin from a newer NVRTC still loads on an older driver of the
same major version, PTX would have to be JIT-compiled by the driver.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from grata.cache import cache_dir as package_cache
from grata.kernels.numpy_update import COS_EPS, check_betas, check_step  # noqa: F401  (COS_EPS: docs)

__all__ = [
    "DeviceArray",
    "KernelUnavailable",
    "adam_update",
    "cache_dir",
    "compile_cubin",
    "grata_update",
    "kernel_source",
    "last_launch",
    "release_stream",
]

BLOCK = 256  # threads per block of the multi-block kernels (GRATA_BLOCK)
SINGLE_BLOCK = 1024  # threads of the one-block kernel (GRATA_SINGLE_BLOCK)
# Shape choice (tunable from the GPU check's sweep through the environment):
# up to SINGLE_BLOCK_MAX_N elements one block of SINGLE_BLOCK threads (2 float4 per thread
# and phase) does everything with no grid barrier; above, a cooperative grid with at least
# MIN_ELEMS_PER_BLOCK elements per block (2 float4 per thread and phase), capped at the
# number of co-resident blocks.
SINGLE_BLOCK_MAX_N = int(os.environ.get("GRATA_KERNEL_SINGLE_MAX", SINGLE_BLOCK * 4 * 2))
MIN_ELEMS_PER_BLOCK = int(os.environ.get("GRATA_KERNEL_MIN_PER_BLOCK", BLOCK * 4 * 2))
KERNEL_NAMES = ("grata_fused_single", "grata_fused", "grata_reduce", "grata_apply", "adam_step")
MODES = ("auto", "single", "cooperative", "two")


class KernelUnavailable(RuntimeError):
    """cuda-python / NVRTC / a CUDA device is missing, or the kernel cannot be built."""


def _core():
    """The cuda.core namespace (top level in recent releases, .experimental before)."""
    try:
        from cuda import core

        core.Program  # noqa: B018  (older releases only have cuda.core.experimental)
        return core
    except (ImportError, AttributeError):
        pass
    try:
        from cuda.core import experimental as core

        return core
    except ImportError as e:
        raise KernelUnavailable(
            "the CUDA path needs cuda-python and cuda-core (pip install 'grata-edge[gpu]')"
        ) from e


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:  # cuda-python < 12.6
        from cuda import cuda as driver
    return driver


def _check_cu(result):
    """Unpack a cuda.bindings return tuple, raising on an error code."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise KernelUnavailable(f"CUDA driver call failed: {err!r}")
    return rest[0] if len(rest) == 1 else rest


# ---------------------------------------------------------------- source, compile, cache


def kernel_source() -> str:
    return resources.files(__package__).joinpath("grata_update.cu").read_text(encoding="utf-8")


def cache_dir() -> Path:
    """Where compiled kernels are kept: the package's cache folder, ``kernels/``."""
    return package_cache() / "kernels"


def _compile_options(arch: str) -> dict:
    return {
        "name": "grata_update",
        "arch": arch,
        "std": "c++17",
        "define_macro": [("GRATA_BLOCK", str(BLOCK)), ("GRATA_SINGLE_BLOCK", str(SINGLE_BLOCK))],
    }


def _nvrtc_version() -> str:
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        from cuda import nvrtc
    _, major, minor = nvrtc.nvrtcVersion()
    return f"{major}.{minor}"


def compile_cubin(arch: str, use_cache: bool = True) -> bytes:
    """The cubin of ``grata_update.cu`` for ``arch`` (e.g. "sm_87"), from the disk cache or
    NVRTC. Needs no GPU."""
    core = _core()
    source = kernel_source()
    options = _compile_options(arch)
    try:
        nvrtc_version = _nvrtc_version()
    except Exception as e:  # the NVRTC library itself is missing
        raise KernelUnavailable(f"NVRTC is not available: {e}") from e
    key = hashlib.sha256(
        "\0".join([source, repr(sorted(options.items())), nvrtc_version]).encode()
    ).hexdigest()[:24]
    path = cache_dir() / arch / f"{key}.cubin"
    if use_cache and path.is_file():
        return path.read_bytes()
    log = _Log()
    try:
        program = core.Program(source, "c++", core.ProgramOptions(**options))
        obj = program.compile("cubin", logs=log)
    except Exception as e:
        raise KernelUnavailable(f"NVRTC could not compile grata_update.cu for {arch}: {e}"
                                f"{log.text()}") from e
    cubin = bytes(obj.code)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(cubin)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs a compile per process
    return cubin


class _Log:
    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s if isinstance(s, str) else bytes(s).decode(errors="replace"))

    def text(self) -> str:
        t = "".join(self.parts).strip()
        return f"\n{t}" if t else ""


# ---------------------------------------------------------------- per-device state


@dataclass
class _DeviceState:
    device_id: int
    arch: str
    kernels: dict
    sm_count: int
    max_coop_blocks: int  # co-resident blocks of grata_fused (cooperative grid limit)
    max_adam_blocks: int
    cooperative: bool
    workspaces: dict  # stream handle -> (Buffer, ptr)
    streams: dict  # stream handle -> cuda.core Stream


_STATES: dict[int, _DeviceState] = {}
_LOCK = threading.Lock()
_WS_PARTIALS_OFFSET = 64  # scal: 2 doubles at 0, sync: 2 uint32 at 16, partials from 64


def _device(device_id: int):
    """cuda.core's Device (a per-thread object), made current on the calling thread."""
    dev = _core().Device(device_id)
    dev.set_current()
    return dev


def _state(device_id: int) -> _DeviceState:
    st = _STATES.get(device_id)
    if st is not None:
        _device(device_id)
        return st
    with _LOCK:
        st = _STATES.get(device_id)
        if st is not None:
            _device(device_id)
            return st
        core = _core()
        try:
            dev = core.Device(device_id)
            dev.set_current()
        except Exception as e:
            raise KernelUnavailable(f"no usable CUDA device {device_id}: {e}") from e
        cc = dev.compute_capability
        arch = f"sm_{cc.major}{cc.minor}"
        obj = core.ObjectCode.from_cubin(compile_cubin(arch))
        kernels = {name: obj.get_kernel(name) for name in KERNEL_NAMES}
        props = dev.properties
        sms = int(props.multiprocessor_count)

        def resident(name, block):
            per_sm = kernels[name].occupancy.max_active_blocks_per_multiprocessor(block, 0)
            return max(1, int(per_sm)) * sms

        st = _DeviceState(
            device_id=device_id,
            arch=arch,
            kernels=kernels,
            sm_count=sms,
            max_coop_blocks=resident("grata_fused", BLOCK),
            max_adam_blocks=resident("adam_step", BLOCK),
            cooperative=bool(getattr(props, "cooperative_launch", False)),
            workspaces={},
            streams={},
        )
        _STATES[device_id] = st
        return st


class _StreamHandle:
    """Adapter: a raw CUstream handle, seen through the __cuda_stream__ protocol."""

    def __init__(self, handle: int):
        self.handle = int(handle)

    def __cuda_stream__(self):
        return (0, self.handle)


def _stream_handle(stream) -> int:
    if isinstance(stream, int):
        return stream
    if hasattr(stream, "__cuda_stream__"):
        proto = stream.__cuda_stream__
        return int((proto() if callable(proto) else proto)[1])
    if hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
        return int(stream.cuda_stream)
    if hasattr(stream, "handle"):
        return int(stream.handle)
    raise ValueError(f"cannot use {stream!r} as a CUDA stream")


def _core_stream(st: _DeviceState, handle: int):
    """The cuda.core Stream of a raw handle, made once per handle (under the lock: two
    threads on one new stream get one object)."""
    s = st.streams.get(handle)
    if s is not None:
        return s
    with _LOCK:
        s = st.streams.get(handle)
        if s is None:
            core = _core()
            if handle in (0, 1) and hasattr(core, "LEGACY_DEFAULT_STREAM"):
                s = core.LEGACY_DEFAULT_STREAM
            elif handle == 2 and hasattr(core, "PER_THREAD_DEFAULT_STREAM"):
                s = core.PER_THREAD_DEFAULT_STREAM
            else:
                s = core.Device(st.device_id).create_stream(_StreamHandle(handle))
            st.streams[handle] = s
    return s


def _workspace(st: _DeviceState, handle: int, stream) -> int:
    """Device pointer of the workspace used on this stream (zeroed once, then kept
    consistent by the kernels). One per stream, so concurrent streams never share the
    barrier counters; made under the lock, freed by `release_stream`."""
    ws = st.workspaces.get(handle)
    if ws is not None:
        return ws[1]
    with _LOCK:
        ws = st.workspaces.get(handle)
        if ws is None:
            size = _WS_PARTIALS_OFFSET + 3 * 8 * max(st.max_coop_blocks, 1)
            buf = _core().Device(st.device_id).allocate(size, stream=stream)
            ptr = int(buf.handle)
            _check_cu(_driver().cuMemsetD8Async(ptr, 0, size, handle))
            ws = (buf, ptr)
            st.workspaces[handle] = ws
    return ws[1]


def release_stream(stream, device_id: int | None = None) -> bool:
    """Forget a stream before it is destroyed: its cached cuda.core Stream and its
    workspace (freed after the work queued on the stream). A raw handle can be reused by
    the driver for a new stream, which must not find the old one's workspace and barrier
    counters. Returns whether anything was cached for it."""
    handle = _stream_handle(stream)
    found = False
    with _LOCK:
        states = [_STATES[device_id]] if device_id in _STATES else (
            list(_STATES.values()) if device_id is None else [])
        for st in states:
            cstream = st.streams.pop(handle, None)
            ws = st.workspaces.pop(handle, None)
            if ws is not None:
                if cstream is not None:
                    cstream.sync()  # the kernels queued on it are done with the workspace
                ws[0].close()
            found = found or cstream is not None or ws is not None
    return found


# ---------------------------------------------------------------- device arrays


class DeviceArray:
    """A flat float32 device buffer given by pointer, exposed with __cuda_array_interface__
    (e.g. an onnxruntime OrtValue's ``data_ptr()``). ``owner`` is kept alive."""

    def __init__(self, ptr: int, n: int, device_id: int = 0, owner=None, readonly=False):
        self.ptr, self.n, self.device_id, self.owner = int(ptr), int(n), int(device_id), owner
        self.readonly = bool(readonly)

    @property
    def __cuda_array_interface__(self):
        return {
            "shape": (self.n,),
            "typestr": "<f4",
            "data": (self.ptr, self.readonly),
            "strides": None,
            "version": 3,
            "stream": None,
        }


@dataclass
class _Arr:
    name: str
    ptr: int
    n: int
    readonly: bool
    device: int | None
    torch_device: object
    cai_stream: int | None


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "is_cuda")


def _describe(name: str, x) -> _Arr:
    if _is_torch(x):
        # Fast path (a few attribute reads instead of building the interface dict).
        if not x.is_cuda:
            raise ValueError(f"{name} is a CPU tensor; the CUDA path needs device arrays")
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D (the flat parameter vector), got shape "
                             f"{tuple(x.shape)}")
        if str(x.dtype) != "torch.float32":
            raise ValueError(f"{name} must be float32 on the CUDA path, got {x.dtype}")
        if x.numel() > 1 and x.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous, got stride {x.stride(0)}")
        ptr = x.data_ptr()
        if ptr % 4:
            raise ValueError(f"{name} is not 4-byte aligned")
        return _Arr(name, ptr, x.numel(), False, x.device.index, x.device, None)
    try:
        cai = x.__cuda_array_interface__
    except (AttributeError, RuntimeError, TypeError) as e:
        raise ValueError(f"{name} is not a CUDA array (no __cuda_array_interface__): {e}") from e
    shape = tuple(cai["shape"])
    if len(shape) != 1:
        raise ValueError(f"{name} must be 1-D (the flat parameter vector), got shape {shape}")
    typestr = cai["typestr"]
    if typestr not in ("<f4", "=f4", "|f4"):
        raise ValueError(f"{name} must be float32 on the CUDA path, got typestr {typestr!r}")
    strides = cai.get("strides")
    if strides is not None and shape[0] > 1 and tuple(strides) != (4,):
        raise ValueError(f"{name} must be contiguous, got strides {tuple(strides)}")
    ptr, readonly = cai["data"]
    ptr = int(ptr or 0)
    if ptr % 4:
        raise ValueError(f"{name} is not 4-byte aligned")
    dev = getattr(x, "device_id", None)
    if dev is None and hasattr(x, "device") and hasattr(x.device, "id"):  # CuPy
        dev = int(x.device.id)
    cai_stream = cai.get("stream") if cai.get("version", 0) >= 3 else None
    return _Arr(name, ptr, shape[0], bool(readonly), dev, None, cai_stream)


def _pointer_device(ptr: int) -> int:
    drv = _driver()
    attr = drv.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
    return int(_check_cu(drv.cuPointerGetAttribute(attr, ptr)))


def _check_device_arrays(outs: list[_Arr], ins: list[_Arr]) -> tuple[int, int]:
    arrs = outs + ins
    n = arrs[0].n
    for a in arrs:
        if a.n != n:
            raise ValueError(f"{a.name} has {a.n} elements, {arrs[0].name} has {n}: same length "
                             "needed")
    for a in outs:
        if a.readonly:
            raise ValueError(f"{a.name} is updated in place and must be writeable")
    if n:
        for i, a in enumerate(outs):
            for b in outs[i + 1:] + ins:
                if a.ptr < b.ptr + 4 * n and b.ptr < a.ptr + 4 * n:
                    raise ValueError(f"{a.name} and {b.name} overlap in memory")
    devices = {a.device for a in arrs if a.device is not None}
    if not devices and n:
        devices = {_pointer_device(arrs[0].ptr)}
    if len(devices) > 1:
        raise ValueError(f"the arrays live on different devices: {sorted(devices)}")
    return n, (devices.pop() if devices else 0)


def _pick_stream(arrs: list[_Arr], device_id: int, stream) -> int:
    if stream is not None:
        return _stream_handle(stream)
    for a in arrs:
        if a.torch_device is not None:
            import torch

            return int(torch.cuda.current_stream(a.torch_device).cuda_stream)
    for a in arrs:
        if a.cai_stream is not None:
            return int(a.cai_stream)
    return 0


# ---------------------------------------------------------------- launches

# What the last call launched (for benchmarks and tests): kernel names, grid, cooperative.
last_launch: dict = {}


def _launch(st, stream, name, grid, block, cooperative, args):
    core = _core()
    try:
        config = core.LaunchConfig(grid=grid, block=block, is_cooperative=cooperative)
    except TypeError:  # cuda.core 0.3 spelling
        config = core.LaunchConfig(grid=grid, block=block, cooperative_launch=cooperative)
    core.launch(stream, config, st.kernels[name], *args)


def _adam_scalars(step: int, betas, eps) -> tuple:
    b1, b2 = check_betas(betas, eps)
    bc1 = 1.0 - b1**step
    bc2_sqrt = math.sqrt(1.0 - b2**step)
    return bc1, (
        np.float32(bc2_sqrt),
        np.float32(b1),
        np.float32(1.0 - b1),
        np.float32(b2),
        np.float32(1.0 - b2),
        np.float32(eps),
    )


def plan(n: int, st: _DeviceState, mode: str = "auto", blocks: int | None = None):
    """(kernel shape, grid) that grata_update uses for n elements."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        if n <= SINGLE_BLOCK_MAX_N:
            mode = "single"
        else:
            mode = "cooperative" if st.cooperative else "two"
    if mode == "single":
        return "single", 1
    want = blocks if blocks is not None else -(-n // MIN_ELEMS_PER_BLOCK)
    grid = max(1, min(int(want), st.max_coop_blocks))
    if mode == "cooperative" and not st.cooperative:
        raise KernelUnavailable("this device does not support cooperative launches")
    return mode, grid


def grata_update(theta, m, v, g_p, g_a, step, beta, betas=(0.9, 0.999), eps=1e-8, *,
                 cos_out=None, stream=None, mode="auto", blocks=None):
    """The GraTa step on device arrays, queued on the stream. Returns cos as a float
    (waits for the stream), or None at once when ``cos_out`` (a float32 device array) is
    given; cos is then written to ``cos_out[0]`` on the device."""
    step = check_step(step)
    beta = float(beta)
    outs = [_describe("theta", theta), _describe("m", m), _describe("v", v)]
    ins = [_describe("g_p", g_p), _describe("g_a", g_a)]
    cos_arr = _describe("cos_out", cos_out) if cos_out is not None else None
    if cos_arr is not None and cos_arr.n < 1:
        raise ValueError("cos_out must hold at least one float32")
    n, device_id = _check_device_arrays(outs, ins)
    if cos_arr is not None and cos_arr.device not in (None, device_id):
        raise ValueError(f"cos_out is on device {cos_arr.device}, the arrays on {device_id}")
    bc1, scal = _adam_scalars(step, betas, eps)
    st = _state(device_id)
    handle = _pick_stream(outs + ins, device_id, stream)
    cstream = _core_stream(st, handle)
    ws = _workspace(st, handle, cstream)
    scal_ptr, sync_ptr, part_ptr = ws, ws + 16, ws + _WS_PARTIALS_OFFSET
    th, mm, vv, gp, ga = (a.ptr for a in outs + ins)
    cptr = np.uint64(cos_arr.ptr if cos_arr is not None else 0)
    shape, grid = plan(n, st, mode, blocks)
    n64, beta64, bc1_64 = np.int64(n), np.float64(beta), np.float64(bc1)
    P = np.uint64
    if shape == "single":
        _launch(st, cstream, "grata_fused_single", 1, SINGLE_BLOCK, False,
                (P(th), P(mm), P(vv), P(gp), P(ga), n64, beta64, bc1_64, *scal,
                 P(scal_ptr), cptr))
        launched = ["grata_fused_single"]
    elif shape == "cooperative":
        _launch(st, cstream, "grata_fused", grid, BLOCK, grid > 1,
                (P(th), P(mm), P(vv), P(gp), P(ga), n64, beta64, bc1_64, *scal,
                 P(part_ptr), P(sync_ptr), P(scal_ptr), cptr))
        launched = ["grata_fused"]
    else:
        _launch(st, cstream, "grata_reduce", grid, BLOCK, False,
                (P(gp), P(ga), n64, beta64, bc1_64, P(part_ptr), P(sync_ptr), P(scal_ptr),
                 cptr))
        agrid = max(1, min(-(-n // (BLOCK * 4)), st.max_adam_blocks))
        _launch(st, cstream, "grata_apply", agrid, BLOCK, False,
                (P(th), P(mm), P(vv), P(gp), n64, P(scal_ptr), *scal))
        launched = ["grata_reduce", "grata_apply"]
    last_launch.clear()
    last_launch.update(kernels=launched, grid=grid, shape=shape, stream=handle, n=n)
    if cos_arr is not None:
        return None
    host = np.zeros(1, dtype=np.float64)
    # Ordered after the kernel on its stream (a copy to pageable memory returns when done).
    _check_cu(_driver().cuMemcpyDtoHAsync(host.ctypes.data, scal_ptr, 8, handle))
    cstream.sync()
    return float(host[0])


def adam_update(theta, m, v, g, step, lr, betas=(0.9, 0.999), eps=1e-8, *, stream=None):
    """Plain Adam (TENT) on device arrays, queued on the stream; returns None at once."""
    step = check_step(step)
    outs = [_describe("theta", theta), _describe("m", m), _describe("v", v)]
    ins = [_describe("g", g)]
    n, device_id = _check_device_arrays(outs, ins)
    bc1, scal = _adam_scalars(step, betas, eps)
    st = _state(device_id)
    handle = _pick_stream(outs + ins, device_id, stream)
    cstream = _core_stream(st, handle)
    grid = max(1, min(-(-n // (BLOCK * 4)), st.max_adam_blocks))
    P = np.uint64
    th, mm, vv, gg = (a.ptr for a in outs + ins)
    _launch(st, cstream, "adam_step", grid, BLOCK, False,
            (P(th), P(mm), P(vv), P(gg), np.int64(n), np.float32(float(lr) / bc1), *scal))
    last_launch.clear()
    last_launch.update(kernels=["adam_step"], grid=grid, shape="adam", stream=handle, n=n)


def read_cos(cos_out) -> float:
    """Host value of a cos_out buffer, after waiting for the whole device."""
    arr = _describe("cos_out", cos_out)
    _core().Device(arr.device if arr.device is not None else 0).sync()
    host = np.zeros(1, dtype=np.float32)
    _check_cu(_driver().cuMemcpyDtoH(host.ctypes.data, arr.ptr, 4))
    return float(host[0])

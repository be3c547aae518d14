"""The CUDA engine: the exported graphs on onnxruntime's CUDA provider, every vector on the GPU.

theta, theta0, the moments (`zeros()`), the gradients and the losses are CuPy arrays. The
graphs run through IOBinding: they read the image and theta from device memory and write
grad / loss / logits into device buffers, and the update (`grata.kernels`) runs the fused
CUDA kernel on the same buffers.

One stream, the engine's own (`stream`, made with the engine, released by `close`):

* onnxruntime computes on it: every session, the mixed-statistics ones opened later too,
  is given it as ``user_compute_stream`` and checked to have taken it (its provider
  options), else the engine refuses to start; runs return without a device sync
  (``disable_synchronize_execution_providers``), which is safe only because of that;
* CuPy's current stream is set to it on entry to every engine call, so the methods'
  arithmetic (``theta -= g_a``) and the fused kernel, which launches on the stream its
  CuPy arrays name (``__cuda_array_interface__``), queue behind the graphs that wrote the
  gradients, and the next graph behind them.

Per image the host waits once (`all_finite`) and copies back only what it reads
(`to_numpy`). TensorFloat-32 is off in the CUDA provider unless `tf32`.

Needs onnxruntime-gpu (not next to the CPU onnxruntime), CuPy, the `gpu` extra for the
kernel, and a CUDA device:

    pip install 'grata-edge[gpu,gpu-onnxruntime]'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from grata.errors import GrataError
from grata.export.manifest import load_manifest
from grata.kernels import adam_update, cuda_update
from grata.runtime.ort_engine import MIXED, StreamStatistics, check_input, load_stats0, load_theta0, route
from grata.runtime.ort_session import (
    available_providers,
    cuda_options,
    engine_sessions,
    import_onnxruntime,
)


def cuda_provider_available() -> bool:
    return "CUDAExecutionProvider" in available_providers()


def provider_options(stream_handle: int, device_id: int = 0, tf32: bool = False) -> dict:
    """CUDA execution provider options that make onnxruntime compute on `stream_handle`
    (TF32 off unless `tf32`)."""
    return cuda_options("tf32" if tf32 else "fp32", device_id=device_id,
                        user_compute_stream=int(stream_handle))


def check_stream(role: str, session, stream_handle: int) -> None:
    """A GrataError unless `session` runs on the CUDA provider with `stream_handle` as its
    compute stream (what it reports in its provider options)."""
    providers = session.get_providers()
    if not providers or providers[0] != "CUDAExecutionProvider":
        raise GrataError(f"onnxruntime could not start CUDAExecutionProvider for {role} (are "
                         f"the CUDA and cuDNN libraries of onnxruntime-gpu installed?)")
    opts = session.get_provider_options().get("CUDAExecutionProvider", {})
    if str(opts.get("user_compute_stream")) != str(int(stream_handle)) or \
            str(opts.get("has_user_compute_stream", "1")) not in ("1", "True", "true"):
        raise GrataError(f"onnxruntime's CUDA provider does not compute {role} on the "
                         f"engine's stream (user_compute_stream "
                         f"{opts.get('user_compute_stream')!r}, expected {int(stream_handle)}); "
                         f"this onnxruntime-gpu cannot run the CUDA engine")


INSTALL = ("pip install 'grata-edge[gpu,gpu-onnxruntime]' (the gpu extra brings CuPy, "
           "cupy-cuda12x)")


class _Place(NamedTuple):
    xp: Any           # the array module: cupy
    kind: str         # IOBinding device type: "cuda"
    index: int        # device ordinal
    providers: list   # onnxruntime providers with their options
    stream: Any       # the stream the graphs, the kernel and CuPy share (None: host)


def _import_cupy():
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def cuda_unavailable(device_id: int = 0) -> str | None:
    """Why the CUDA engine cannot run on `device_id` (one line), or None when it can."""
    cp = _import_cupy()
    missing = [name for name, ok in (("onnxruntime-gpu", cuda_provider_available()),
                                     ("cupy", cp is not None)) if not ok]
    if missing:
        return f"--device cuda with --engine onnx needs {' and '.join(missing)}: {INSTALL}"
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001  (no driver, driver too old: CUDARuntimeError)
        return f"--device cuda: no CUDA device ({_first_line(e)})"
    if not 0 <= device_id < count:
        return f"--device cuda: no CUDA device {device_id} ({count} found)"
    return None


def _cuda_place(device_id: int, tf32: bool) -> _Place:
    why = cuda_unavailable(device_id)
    if why:
        raise GrataError(why)
    cp = _import_cupy()
    with cp.cuda.Device(device_id):
        # The engine's own stream. Blocking: work a caller queues on the legacy default
        # stream (another thread's CuPy) is still ordered with it.
        stream = cp.cuda.Stream(non_blocking=False)
    opts = provider_options(stream.ptr, device_id, tf32)
    return _Place(cp, "cuda", device_id, [("CUDAExecutionProvider", opts),
                                          "CPUExecutionProvider"], stream)


def _ptr(a) -> int:
    return a.data.ptr if hasattr(a.data, "ptr") else a.ctypes.data


class _DeviceScalar:
    """A float32 result left on the device (cos): 1-D for the kernel, read by float()."""

    def __init__(self, xp):
        self.array = xp.zeros(1, dtype=xp.float32)

    @property
    def __cuda_array_interface__(self):
        return self.array.__cuda_array_interface__

    def __float__(self) -> float:
        return float(self.array[0])


class CudaEngine(StreamStatistics):
    """Answers as `grata.engine_protocol.Engine`, like `OrtEngine`; theta and every vector a
    method makes stay on the GPU.

    The gradients returned by `entropy_grad` / `consistency_grad` are the engine's output
    buffers: valid until the next call of the same graph."""

    kind = "onnx"
    device = "cuda"

    def __init__(self, artifacts, device_id: int = 0, threads: int | None = None,
                 verify: bool = True, tf32: bool = False):
        ort = import_onnxruntime()
        self._place = place = _cuda_place(device_id, tf32)
        self.xp = xp = place.xp
        self._enter()
        self.folder = Path(artifacts)
        self.manifest = m = load_manifest(self.folder, verify=verify)
        self.size, self.layout, self.dtype = int(m["size"]), m["params"], np.float32
        self.theta0 = xp.asarray(load_theta0(self.folder, m))
        self.theta = self.theta0.copy()
        stats0 = load_stats0(self.folder, m)  # statistics rules other than sample
        self.stats0 = None if stats0 is None else xp.asarray(stats0)
        self.stats = None if stats0 is None else self.stats0.copy()
        self.img_stats = None if stats0 is None else xp.zeros_like(self.stats0)
        self._alphas = {}
        try:  # compiles (or loads) the fused update now rather than at the first image
            adam_update(*(xp.zeros(1, dtype=xp.float32) for _ in range(4)), 1, 0.0)
        except Exception as e:  # noqa: BLE001  (KernelUnavailable, NVRTC, driver errors)
            raise GrataError(f"--device cuda: the fused update kernel cannot run "
                             f"({_first_line(e)}): pip install 'grata-edge[gpu]'") from None
        # the CPU engine's settings where the graphs run on the CPU provider (the same
        # numbers as OrtEngine); plain session options on CUDA. The mixed graphs open on
        # first use.
        self.sessions = engine_sessions(self.folder, m, place.providers, threads,
                                        eager=[r for r in m["graphs"]
                                               if r not in MIXED.values()])
        for role, s in self.sessions.opened().items():
            self._check_session(role, s)
        self._run_options = ort.RunOptions()
        # No cudaStreamSynchronize at the end of each run: the next step is on the stream.
        self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._bindings = {role: s.io_binding() for role, s in self.sessions.opened().items()}
        self._outputs = {}
        for role in ("entropy_grad", "consistency_grad"):
            self._bind_grad_outputs(role)

    def _check_session(self, role: str, session) -> None:
        """Every session computes on the engine's stream (see the module docstring)."""
        if self._place.stream is not None:
            check_stream(role, session, self._place.stream.ptr)

    def _bind_grad_outputs(self, role: str) -> None:
        p, xp = self._place, self.xp
        out = {"loss": xp.zeros((), dtype=xp.float32), "grad": xp.zeros_like(self.theta)}
        for name, a in out.items():
            self._bindings[role].bind_output(name, p.kind, p.index, np.float32,
                                             list(a.shape), _ptr(a))
        self._outputs[role] = out

    def _graph(self, role: str, norm) -> tuple[str, dict]:
        """The graph for `role` under `norm` (opened and bound on first use) and the
        statistics inputs it takes."""
        graph, spec = route(self, role, norm)
        if graph not in self._bindings:
            session = self.sessions[graph]  # opens it (the mixed graphs: on first use)
            self._check_session(graph, session)
            self._bindings[graph] = session.io_binding()
            if graph != "infer_mix":
                self._bind_grad_outputs(graph)
            else:
                p = self._place
                self._bindings[graph].bind_output("img_stats", p.kind, p.index, np.float32,
                                                  list(self.img_stats.shape),
                                                  _ptr(self.img_stats))
        if not graph.endswith("_mix"):
            return graph, {}
        if spec.alpha not in self._alphas:
            self._alphas[spec.alpha] = self.xp.asarray([spec.alpha], dtype=self.xp.float32)
        stats = self.stats if spec.kind == "ema" else self.stats0
        return graph, {"stats": stats, "alpha": self._alphas[spec.alpha]}

    def _enter(self) -> None:
        p = self._place
        if p.stream is not None:  # the device and stream CuPy uses on this thread
            self.xp.cuda.Device(p.index).use()
            p.stream.use()

    @property
    def stream(self):
        """The engine's stream: onnxruntime's, the kernel's and CuPy's (None on the host)."""
        return self._place.stream

    def close(self) -> None:
        """Release the sessions, then the stream (after the work queued on it) and what
        the kernel cached for it."""
        p = self._place
        self._bindings, self._outputs = {}, {}
        self.sessions = None
        if p.stream is not None:
            p.stream.synchronize()
            cuda_update.release_stream(p.stream.ptr, p.index)
            self._place = p._replace(stream=None)

    # array helpers
    def to_input(self, image):
        """A [3,S,S] or [1,3,S,S] host image -> a device array (one upload)."""
        x = check_input(image, self.size)
        self._enter()
        return self.xp.asarray(x)

    @staticmethod
    def to_numpy(x) -> np.ndarray:
        x = x.array if isinstance(x, _DeviceScalar) else x
        return x.get() if hasattr(x, "__cuda_array_interface__") else np.asarray(x)

    def zeros(self):
        self._enter()
        return self.xp.zeros_like(self.theta)

    def copy(self, a):
        self._enter()
        return a.copy()

    def assign(self, dst, src) -> None:
        self._enter()
        dst[...] = self.xp.asarray(src)

    def all_finite(self, *arrays) -> bool:
        """One check (one device sync) over every array and scalar given."""
        self._enter()
        xp = self.xp
        flags = [xp.isfinite(xp.asarray(a.array if isinstance(a, _DeviceScalar) else a)).all()
                 for a in arrays]
        return bool(xp.stack(flags).all()) if flags else True

    def scalar(self):
        """A device float32 scalar for cos (None on the host, like `OrtEngine`)."""
        self._enter()
        return _DeviceScalar(self.xp) if self._place.stream is not None else None

    # the three questions
    def _run(self, role: str, **inputs) -> None:
        self._enter()
        binding, p = self._bindings[role], self._place
        for name, a in inputs.items():
            binding.bind_input(name, p.kind, p.index, np.float32, list(a.shape), _ptr(a))
        self.sessions[role].run_with_iobinding(binding, self._run_options)

    def infer(self, x, norm: str = "sample"):
        role, stats = self._graph("infer", norm)
        logits = self.xp.empty((1, 2, self.size, self.size), dtype=self.xp.float32)
        p = self._place
        self._bindings[role].bind_output("logits", p.kind, p.index, np.float32,
                                         list(logits.shape), _ptr(logits))
        self._run(role, image=x, theta=self.theta, **stats)
        return logits

    def entropy_grad(self, x, norm: str = "sample"):
        role, stats = self._graph("entropy_grad", norm)
        self._run(role, image=x, theta=self.theta, **stats)
        out = self._outputs[role]
        return out["loss"], out["grad"]

    def consistency_grad(self, x, strong, norm: str = "sample"):
        role, stats = self._graph("consistency_grad", norm)
        self._run(role, image=x, strong_image=strong, theta=self.theta, **stats)
        out = self._outputs[role]
        return out["loss"], out["grad"]


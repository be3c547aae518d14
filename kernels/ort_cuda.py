"""onnxruntime CUDA path: theta, Adam moments and gradients live in device OrtValues.

The gradient graphs write g_a / g_p straight into these buffers (IOBinding outputs), read
theta from them (IOBinding inputs), and the fused kernel updates theta, m, v in place, so
nothing crosses to the host between the gradient passes, the update and the next pass.
Only cos comes back, and only when asked for.

Ordering: the state owns a CUDA stream and launches the kernel on it. Build the session
with ``state.provider_options()`` so onnxruntime computes on that same stream: gradient
graph -> kernel -> next graph are then ordered on the device with no host wait. (With a
session on its own stream, call ``state.synchronize()`` after the update instead;
``run_with_iobinding`` already waits for its own stream before returning.)

Needs onnxruntime-gpu and the ``gpu`` extra; import it only on a machine with CUDA.
"""

from __future__ import annotations

import numpy as np

from .cuda_update import DeviceArray

__all__ = ["OrtDeviceState", "cuda_provider_available", "provider_options"]

NAMES = ("theta", "m", "v", "g_p", "g_a")


def cuda_provider_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def provider_options(stream_handle: int, device_id: int = 0) -> dict:
    """CUDA execution provider options that make onnxruntime compute on ``stream_handle``."""
    return {"device_id": str(device_id), "user_compute_stream": str(int(stream_handle))}


class OrtDeviceState:
    """Flat device buffers of one adaptation: theta, m, v, g_p, g_a (float32, length n)
    and cos (1 float32), as OrtValues with DeviceArray views for the kernel."""

    def __init__(self, theta0: np.ndarray, device_id: int = 0, stream=None):
        import onnxruntime as ort

        from . import cuda_update

        theta0 = np.ascontiguousarray(theta0, dtype=np.float32).ravel()
        self.n, self.device_id = theta0.shape[0], device_id
        zeros = np.zeros(self.n, dtype=np.float32)
        self.values = {
            name: ort.OrtValue.ortvalue_from_numpy(theta0 if name == "theta" else zeros,
                                                   "cuda", device_id)
            for name in NAMES
        }
        self.values["cos"] = ort.OrtValue.ortvalue_from_numpy(
            np.zeros(1, dtype=np.float32), "cuda", device_id)
        self.step = 0
        if stream is None:
            core = cuda_update._core()
            dev = core.Device(device_id)
            dev.set_current()
            stream = dev.create_stream()
        self.stream = stream
        self.stream_handle = cuda_update._stream_handle(stream)
        if hasattr(stream, "sync"):  # a cuda.core Stream: launch on it directly
            cuda_update._state(device_id).streams[self.stream_handle] = stream

    def provider_options(self) -> dict:
        """Options of the CUDA execution provider that put onnxruntime on this stream."""
        return provider_options(self.stream_handle, self.device_id)

    def synchronize(self) -> None:
        """Wait for the work queued on this state's stream."""
        from . import cuda_update

        st = cuda_update._state(self.device_id)
        cuda_update._core_stream(st, self.stream_handle).sync()

    def array(self, name: str) -> DeviceArray:
        value = self.values[name]
        n = 1 if name == "cos" else self.n
        return DeviceArray(value.data_ptr(), n, self.device_id, owner=value)

    def bind(self, binding, inputs: dict | None = None, outputs: dict | None = None) -> None:
        """Bind buffers to graph names: ``inputs={"theta": "theta"}``,
        ``outputs={"grad": "g_a"}`` (graph name -> buffer name)."""
        for graph_name, name in (inputs or {}).items():
            binding.bind_ortvalue_input(graph_name, self.values[name])
        for graph_name, name in (outputs or {}).items():
            binding.bind_ortvalue_output(graph_name, self.values[name])

    def grata_step(self, beta: float, betas=(0.9, 0.999), eps=1e-8) -> None:
        """The GraTa update of theta, m, v from the bound g_p, g_a; cos stays on the
        device (``read_cos``)."""
        from . import cuda_update

        self.step += 1
        a = {name: self.array(name) for name in NAMES}
        cuda_update.grata_update(a["theta"], a["m"], a["v"], a["g_p"], a["g_a"], self.step,
                                 beta, betas, eps, cos_out=self.array("cos"),
                                 stream=self.stream_handle)

    def adam_step(self, lr: float, grad: str = "g_a", betas=(0.9, 0.999), eps=1e-8) -> None:
        """Plain Adam (TENT) from the buffer ``grad``."""
        from . import cuda_update

        self.step += 1
        cuda_update.adam_update(self.array("theta"), self.array("m"), self.array("v"),
                                self.array(grad), self.step, lr, betas, eps,
                                stream=self.stream_handle)

    def read_cos(self) -> float:
        from . import cuda_update

        return cuda_update.read_cos(self.array("cos"))

    def theta(self) -> np.ndarray:
        """A host copy of theta (for checkpoints and tests, not for the loop)."""
        return self.values["theta"].numpy()

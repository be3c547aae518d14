"""Which engine answers the gradient questions on a device: `open_engine`."""

from __future__ import annotations

from grata.runtime.engine import OrtEngine


def open_engine(artifacts, device: str = "cpu", threads: int | None = None,
                verify: bool = True):
    """The engine for `device`: on "cuda" `CudaEngine` (theta, moments and gradients stay
    on the GPU), otherwise `OrtEngine`."""
    if device == "cuda":
        from grata.runtime.cuda_engine import CudaEngine

        return CudaEngine(artifacts, threads=threads, verify=verify)
    return OrtEngine(artifacts, device=device, threads=threads, verify=verify)

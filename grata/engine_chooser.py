"""The one place an engine is chosen and made: `open_engine` (kind, device, artifacts or
checkpoint or model). Every command, benchmark and method asks it; the engine classes are
`grata.runtime.ort_engine.OrtEngine`, `grata.runtime.cuda_engine.CudaEngine` and
`grata.torch_engine.TorchEngine` (all answer `grata.engine_protocol.Engine`).

Importing this module imports neither torch nor onnxruntime: each kind's engine is
imported when one is made.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from grata.engine_protocol import DEVICES, ENGINE_KINDS
from grata.errors import GrataError
from grata.runtime.ort_engine import OrtEngine
from grata.runtime.cuda_engine import CudaEngine

ONNX_DEVICES = ("cpu", "cuda", "tensorrt")  # onnxruntime providers the graphs run on


def open_engine(artifacts=None, device: str | None = None, threads: int | None = None,
                verify: bool = True, *, kind: str = "onnx", checkpoint=None,
                arch: str | None = None, model=None, host_arrays: bool = False,
                precision: str = "fp32", cache_dir=None, tuning: dict | None = None):
    """A fresh engine.

    ``onnx`` (default) over the artifact folder `artifacts`, on `device` (default cpu):
    ``cpu`` -> OrtEngine; ``cuda`` -> CudaEngine (theta, moments and gradients stay on the
    GPU), or OrtEngine on the CUDA provider with host arrays when `host_arrays` is set or
    `tuning` is given; ``tensorrt`` -> OrtEngine on the TensorRT provider at `precision`
    (engines cached in `cache_dir`). `tuning` (keys of
    `grata.runtime.ort_session.TUNING`) changes the session settings for measurements.
    ``torch`` over `model` (a torch module, adapted in place, on its own device unless
    `device` is given) or a checkpoint of `arch`, on `device` (default cpu).
    A bad choice is one line (GrataError)."""
    if kind not in ENGINE_KINDS:
        raise GrataError(f"unknown engine {kind!r}; choose from {', '.join(ENGINE_KINDS)}")
    if kind == "torch":
        return _torch_engine(device, checkpoint, arch, model)
    device = device or "cpu"
    if device not in ONNX_DEVICES:
        raise GrataError(f"unknown device {device!r}; choose from {', '.join(ONNX_DEVICES)}")
    if device == "cuda" and not host_arrays and not tuning:
        return CudaEngine(artifacts, threads=threads, verify=verify)
    return OrtEngine(artifacts, device=device, threads=threads, verify=verify,
                     precision=precision, cache_dir=cache_dir, tuning=tuning)


def _torch_engine(device: str | None, checkpoint, arch: str | None, model):
    if device is not None and device not in DEVICES:
        raise GrataError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    import torch

    from grata.models import load_checkpoint
    from grata.torch_engine import TorchEngine
    if device == "cuda" and not torch.cuda.is_available():
        raise GrataError("--device cuda: this torch sees no CUDA device")
    if model is None:
        if checkpoint is None:
            raise GrataError("--engine torch needs a checkpoint")
        model = load_checkpoint(checkpoint, arch)
        device = device or "cpu"
    return TorchEngine(model, device=device)


def engine_factory(kind: str, *, device: str = "cpu", artifacts: Path | None = None,
                   checkpoint: Path | None = None, arch: str | None = None,
                   threads: int | None = None) -> Callable[[], object]:
    """A zero-argument callable that opens a fresh engine (`open_engine`) for each method
    of a run; a bad kind or device fails here, before any engine is made."""
    if kind not in ENGINE_KINDS:
        raise GrataError(f"unknown engine {kind!r}; choose from {', '.join(ENGINE_KINDS)}")
    if device not in DEVICES:
        raise GrataError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if kind == "torch" and device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise GrataError("--device cuda: this torch sees no CUDA device")

    def make():
        if kind == "onnx":
            return open_engine(artifacts, device, threads)
        return open_engine(device=device, kind="torch", checkpoint=checkpoint, arch=arch)
    return make


__all__ = ["ONNX_DEVICES", "engine_factory", "open_engine"]

"""Opening an engine by kind (onnx, torch) and device (cpu, cuda): what `grata adapt` runs on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from grata.engine import DEVICES, ENGINE_KINDS
from grata.errors import GrataError


def engine_factory(kind: str, *, device: str = "cpu", artifacts: Path | None = None,
                   checkpoint: Path | None = None, arch: str | None = None,
                   threads: int | None = None) -> Callable[[], object]:
    """A zero-argument callable that makes a fresh engine: ``onnx`` over an artifact
    folder (`grata.runtime.open_engine`) or ``torch`` over a checkpoint of `arch`
    (`grata.torch_engine.TorchEngine`), on `device`."""
    if kind not in ENGINE_KINDS:
        raise GrataError(f"unknown engine {kind!r}; choose from {', '.join(ENGINE_KINDS)}")
    if device not in DEVICES:
        raise GrataError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if kind == "onnx":
        from grata.runtime import open_engine

        def make_onnx():
            return open_engine(artifacts, device=device, threads=threads)
        return make_onnx
    from grata.models import load_checkpoint
    from grata.torch_engine import TorchEngine
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise GrataError("--device cuda: this torch sees no CUDA device")

    def make_torch():
        return TorchEngine(load_checkpoint(checkpoint, arch), device=device)
    return make_torch

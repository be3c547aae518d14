"""What every engine answers: the contract the methods are written against.

An engine owns theta (the flat vector of every BN gamma/beta) and answers three
questions at the current theta: the logits, the entropy gradient and the consistency
gradient. `grata.torch_engine.TorchEngine` answers them with autograd (the reference),
`grata.runtime.OrtEngine` and `grata.runtime.CudaEngine` with the exported graphs.
Arrays are the engine's own (numpy, torch or CuPy); the helpers below let a method
work on them without knowing which.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

ENGINE_KINDS = ("onnx", "torch")   # who answers the gradient questions
DEVICES = ("cpu", "cuda")          # where


@runtime_checkable
class Engine(Protocol):
    """The questions a method asks of an engine (see the module docstring)."""

    kind: str       # "onnx" or "torch"
    device: str     # "cpu" or "cuda"
    theta: Any      # current flat BN gamma/beta, changed in place by the update
    theta0: Any     # the source theta

    def to_input(self, image) -> Any:
        """A [3,S,S] or [1,3,S,S] host image -> the engine's model input."""

    def to_numpy(self, x) -> Any:
        """An engine array (or scalar) -> a host numpy array."""

    def zeros(self) -> Any:
        """A zero vector shaped like theta (Adam's moments)."""

    def copy(self, a) -> Any:
        """An independent copy of an engine array."""

    def assign(self, dst, src) -> None:
        """dst[...] = src, src an engine or host array."""

    def all_finite(self, *arrays) -> bool:
        """Whether every array and scalar given is finite (one device sync)."""

    def scalar(self) -> Any:
        """A device scalar for results read later, or None on the host."""

    def infer(self, x, norm: str = "sample") -> Any:
        """The logits [1,2,S,S] of x at theta."""

    def entropy_grad(self, x) -> tuple[Any, Any]:
        """(entropy loss, its gradient w.r.t. theta) at theta."""

    def consistency_grad(self, x, strong) -> tuple[Any, Any]:
        """(consistency loss, its gradient w.r.t. theta) at theta, teacher on x and
        student on the strong view."""


__all__ = ["DEVICES", "ENGINE_KINDS", "Engine"]

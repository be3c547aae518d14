"""What every engine answers: the contract the methods and the pipeline are written against.

An engine owns theta (the flat vector of every BN gamma/beta) and answers three
questions at the current theta: the logits, the entropy gradient and the consistency
gradient. `grata.torch_engine.TorchEngine` answers them with autograd (the reference),
`grata.runtime.ort_engine.OrtEngine` and `grata.runtime.cuda_engine.CudaEngine` with the
exported graphs; `grata.engine_chooser.open_engine` makes one. Arrays are the engine's own
(numpy, torch or CuPy); the helpers below let a method work on them without knowing which.

Each question takes the BN statistics rule `norm` (`grata.norm`). The engine also owns the
statistics vectors, in theta's layout (`layout`): `stats0` (the stored running
statistics), `stats` (the stream estimate of ``ema``, part of the adapted state:
`norm_state` / `load_norm_state`) and `img_stats` (the image's own statistics from the
last mixed `infer`). Artifacts exported before the statistics rules have none of them
(None), and only ``sample`` / ``source`` run on them.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

ENGINE_KINDS = ("onnx", "torch")   # who answers the gradient questions
DEVICES = ("cpu", "cuda")          # where


@runtime_checkable
class Engine(Protocol):
    """The questions a method and the per-image pipeline ask of an engine (see the module
    docstring)."""

    kind: str         # "onnx" or "torch"
    device: str       # "cpu" or "cuda": where the engine's arrays live
    size: int | None  # the input side the engine takes (None: any, the torch model)
    dtype: Any        # theta's element type
    layout: Any       # theta's layout: the BN layers and their channel counts
    theta: Any        # current flat BN gamma/beta, changed in place by the update
    theta0: Any       # the source theta
    stats0: Any       # the stored running statistics (theta's layout), or None
    stats: Any        # the stream statistics of ``ema`` (theta's layout), or None
    img_stats: Any    # the image's own statistics from the last mixed `infer`, or None

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

    def norm_state(self) -> Any:
        """A host float32 copy of the stream statistics `stats`."""

    def load_norm_state(self, stats) -> None:
        """Set the stream statistics from a host array (one-line error on a misfit)."""

    def infer(self, x, norm: str = "sample") -> Any:
        """The logits [1,2,S,S] of x at theta under the statistics rule `norm`."""

    def entropy_grad(self, x, norm: str = "sample") -> tuple[Any, Any]:
        """(entropy loss, its gradient w.r.t. theta) at theta."""

    def consistency_grad(self, x, strong, norm: str = "sample") -> tuple[Any, Any]:
        """(consistency loss, its gradient w.r.t. theta) at theta, teacher on x and
        student on the strong view."""


def protocol_members() -> tuple[list[str], dict[str, list[str]]]:
    """(the attributes, {method: its parameter names}) an engine must have."""
    attributes = sorted(Engine.__annotations__)
    methods = {}
    for name, fn in vars(Engine).items():
        if callable(fn) and not name.startswith("_"):
            methods[name] = list(inspect.signature(fn).parameters)
    return attributes, methods


__all__ = ["DEVICES", "ENGINE_KINDS", "Engine", "protocol_members"]

"""Test-time methods by name: `create(name, model_or_engine, **hyperparameters)`."""

from __future__ import annotations

from ..errors import GrataError
from .base import Method
from .hyperparameters import parse_hp, resolved_hyperparameters
from .registry import METHODS


def create(name: str, model, **hyperparameters) -> Method:
    """A method over a torch model (wrapped in a TorchEngine) or an existing engine."""
    if name not in METHODS:
        raise GrataError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    engine = model
    if not hasattr(model, "entropy_grad"):
        from ..torch_engine import TorchEngine
        engine = TorchEngine(model)
    return METHODS[name](engine, **hyperparameters)


__all__ = ["METHODS", "Method", "create", "parse_hp", "resolved_hyperparameters"]

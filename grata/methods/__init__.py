"""Test-time methods by name: `create(name, model_or_engine, norm=..., **hyperparameters)`.

A method runs on top of any BN statistics choice (`grata.norm`): ``create("grata", model,
norm="mix:0.2")``. `parse_method` reads the ``method@norm`` form (``"grata@mix:0.2"``).
"""

from __future__ import annotations

from grata.engine_chooser import open_engine
from grata.errors import GrataError
from grata.norm import NormSpec, parse_norm
from grata.methods.base import Method
from grata.methods.hyperparameters import resolved_hyperparameters
from grata.methods.registry import METHODS


def create(name: str, model, norm="sample", alpha: float | None = None,
           prior_n: float | None = None, momentum: float | None = None,
           **hyperparameters) -> Method:
    """A method over a torch model (wrapped in a torch engine, `grata.engine_chooser`) or
    an existing engine.

    `norm` is the BN statistics rule (a `grata.norm.NormSpec` or its text: ``source``,
    ``sample`` (the paper), ``mix:0.2``, ``mix:n16``, ``ema:0.1``); `alpha`, `prior_n` and
    `momentum` give a bare ``mix`` / ``ema`` its parameters. The source method always uses
    the stored statistics, whatever `norm` says.
    """
    if name not in METHODS:
        raise GrataError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    spec = parse_norm(norm, alpha=alpha, prior_n=prior_n, momentum=momentum)
    engine = model
    if not hasattr(model, "entropy_grad"):
        engine = open_engine(kind="torch", model=model)
    return METHODS[name](engine, norm=spec, **hyperparameters)


def parse_method(spec: str) -> tuple[str, NormSpec | None]:
    """``"grata@mix:0.2"`` -> ("grata", NormSpec("mix:0.2")); ``"grata"`` -> ("grata",
    None) (None: the run's statistics choice). A bad name or statistics spec is a one-line
    `GrataError`; ``source@...`` with other than source statistics is refused."""
    text = str(spec).strip()
    name, sep, norm = text.partition("@")
    name = name.strip()
    if name not in METHODS:
        raise GrataError(f"unknown method {name!r} in {text!r}; choose from "
                         f"{', '.join(METHODS)} (optionally @statistics, e.g. grata@mix:0.2)")
    if not sep:
        return name, None
    parsed = NormSpec(norm)
    if METHODS[name].fixed_norm and parsed != METHODS[name].norm:
        raise GrataError(f"{text!r}: the {name} method always uses {METHODS[name].norm} "
                         f"statistics")
    return name, parsed


__all__ = ["METHODS", "Method", "create", "parse_method", "resolved_hyperparameters"]

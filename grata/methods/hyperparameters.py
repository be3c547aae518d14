"""Hyperparameters of the methods: `--hp METHOD.NAME=VALUE` and config files, validated
against each method's constructor, and the full resolved set a run records."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from grata.errors import GrataError
from grata.methods.base import Method
from grata.methods.registry import METHODS

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the tomli package, where installed (only --config needs it)
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

# constructor arguments that are not hyperparameters: the engine, the run's seed, and the
# statistics rule (chosen per method with --norm / METHOD@RULE and recorded on its own)
_NOT_HYPER = ("self", "engine", "seed", "norm", "kw", "hyperparameters")


def defaults_of(cls: type[Method]) -> dict:
    """{name: default} of every hyperparameter of a method class (over its MRO)."""
    out: dict = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name in _NOT_HYPER or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            out[p.name] = p.default
    return out


def _coerce(method: str, name: str, value, default):
    """`value` (a string from the command line, or a TOML value) as `default`'s type."""
    where = f"{method}.{name}"
    if isinstance(default, tuple):
        items = value if isinstance(value, (list, tuple)) else \
            [v for v in str(value).split(",") if v.strip()]
        if len(items) != len(default):
            raise GrataError(f"--hp {where}: expected {len(default)} comma-separated values, "
                             f"got {value!r}")
        return tuple(_coerce(method, name, v, d) for v, d in zip(items, default))
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return text in ("true", "1")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        raise GrataError(f"--hp {where}={value!r}: not a {type(default).__name__}") from None
    return value


def resolved_hyperparameters(method: str, given: dict | None = None) -> dict:
    """Every hyperparameter of `method`: its constructor defaults updated with `given`
    (values coerced to the default's type). An unknown method or name is a GrataError."""
    if method not in METHODS:
        raise GrataError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    defaults = defaults_of(METHODS[method])
    out = dict(defaults)
    for name, value in (given or {}).items():
        if name not in defaults:
            known = ", ".join(defaults) or "none"
            raise GrataError(f"--hp {method}.{name}: {method} has no hyperparameter "
                             f"{name!r} (it has: {known})")
        out[name] = _coerce(method, name, value, defaults[name])
    return out


def load_config(path: Path) -> dict:
    """A TOML config file as a dict (tomllib on Python 3.11+, else tomli)."""
    if tomllib is None:
        raise GrataError("--config needs Python 3.11 or the tomli package on this "
                         "Python: pip install tomli (or use --hp)")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise GrataError(f"--config {path}: cannot read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise GrataError(f"--config {path}: not valid TOML ({exc})") from None


def as_json(hyperparameters: dict) -> dict:
    """Hyperparameters with tuples as lists (what JSON holds; `resolved_hyperparameters`
    turns them back into tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in hyperparameters.items()}

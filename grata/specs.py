"""The methods of a run as written on the command line: ``METHOD[@RULE][+gate]``.

``grata@mix:0.2`` is GraTa under mixed statistics, a plain ``grata`` is GraTa under the
run's default rule (``--norm``), ``+gate`` adds the label-free safety gate
(`grata.gate`). One run may hold a method under several rules; results, report rows,
tables and overlays are keyed by the spec's canonical text (its `key`: the name, the rule
when one was written, ``+gate``), e.g. ``grata@mix:0.2``.

Hyperparameters (``--hp KEY.NAME=VALUE``, ``--config`` tables) are given per method name
(``grata.beta``: every spec of that method) or per spec key (``grata@mix:0.2.beta``: that
spec only, winning over the method's). Torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from grata.errors import GrataError
from grata.methods import METHODS, parse_method
from grata.methods.hyperparameters import load_config, resolved_hyperparameters
from grata.norm import NormSpec

GATE_SUFFIX = "gate"
_RULE_PARAM = re.compile(r"^(a=|m=|n=?)?[0-9.]")


@dataclass(frozen=True)
class RunSpec:
    """One method of a run: its `key` (as in the results), `method` name, resolved `norm`
    and whether the safety gate judges its predictions."""

    key: str
    method: str
    norm: NormSpec
    gate: bool = False


def split_specs(text: str) -> list[str]:
    """Comma-separated specs; a comma inside a rule (``ema:0.1,0.5``) stays in it (an
    argparse type)."""
    out: list[str] = []
    for token in (t.strip() for t in str(text).split(",")):
        if not token:
            continue
        if out and "@" in out[-1] and _RULE_PARAM.match(token):
            out[-1] += "," + token  # a parameter of the previous rule: the 0.5 of ema:0.1,0.5
        else:
            out.append(token)
    return out


def parse_spec(text: str, default_norm="sample") -> RunSpec:
    """One ``METHOD[@RULE][+gate]`` -> a `RunSpec` (a bad part is a one-line GrataError)."""
    base, plus, suffix = str(text).strip().partition("+")
    if plus and suffix.strip().lower() != GATE_SUFFIX:
        raise GrataError(f"{text!r}: unknown suffix '+{suffix}'; the only one is "
                         f"+{GATE_SUFFIX} (the safety gate)")
    name, rule = parse_method(base)
    explicit = rule is not None
    if METHODS[name].fixed_norm:
        rule = METHODS[name].norm
    elif rule is None:
        rule = NormSpec(default_norm)
    key = f"{name}@{rule}" if explicit else name
    gate = bool(plus)
    return RunSpec(key + (f"+{GATE_SUFFIX}" if gate else ""), name, rule, gate)


def parse_specs(items, default_norm="sample") -> list[RunSpec]:
    """The run's specs; the same method under the same rule (and gate) twice is refused."""
    specs = [parse_spec(t, default_norm) for t in items]
    if not specs:
        raise GrataError("no methods given")
    seen: dict[tuple, str] = {}
    for s in specs:
        ident = (s.method, str(s.norm), s.gate)
        if ident in seen:
            raise GrataError(f"methods {seen[ident]!r} and {s.key!r} are the same "
                             f"({s.method} under {s.norm} statistics); give it once")
        seen[ident] = s.key
    return specs


def spec_hyperparameters(specs: list[RunSpec], hp_items=(), config: Path | None = None,
                         default_norm="sample", base: dict | None = None) -> dict[str, dict]:
    """{spec key: full hyperparameters} from `base` ({method: {name: value}}: defaults
    that replace the constructors' own, e.g. the product's), a TOML file (tables per
    method name or spec key) and ``--hp KEY.NAME=VALUE`` items (which win); a spec's own
    entries win over its method's. A key naming nothing in the run, a misspelt name or a
    bad value is a GrataError."""
    given: dict[str, dict] = {}

    def target(key: str, where: str) -> str:
        names = {s.method for s in specs}
        if key in names:
            return key
        try:
            canon = parse_spec(key, default_norm).key
        except GrataError:
            canon = None
        if canon is None or canon not in {s.key for s in specs}:
            raise GrataError(f"{where} {key}.*: method {key!r} is not in this run "
                             f"({', '.join(s.key for s in specs)})")
        return canon

    if config is not None:
        for key, table in load_config(config).items():
            if not isinstance(table, dict):
                raise GrataError(f"--config {config}: {key!r} must be a table of "
                                 "hyperparameters ([method] name = value)")
            given.setdefault(target(key, "--config"), {}).update(table)
    for item in hp_items or ():
        key, eq, value = str(item).partition("=")
        method, dot, name = key.strip().rpartition(".")
        if not eq or not dot or not method or not name:
            raise GrataError(f"--hp {item!r}: write METHOD.NAME=VALUE, e.g. grata.beta=1e-3")
        given.setdefault(target(method, "--hp"), {})[name] = value.strip()
    out = {}
    for s in specs:
        merged = {**(base or {}).get(s.method, {}), **given.get(s.method, {}),
                  **(given.get(s.key, {}) if s.key != s.method else {})}
        out[s.key] = resolved_hyperparameters(s.method, merged)
    return out


def folder_name(key: str) -> str:
    """A spec key as a folder name that every file system takes (``:`` is not allowed on
    FAT and exFAT, where runs get copied): ``grata@mix:0.2`` -> ``grata@mix_0.2``."""
    return str(key).replace(":", "_")


__all__ = [
    "GATE_SUFFIX",
    "RunSpec",
    "folder_name",
    "parse_spec",
    "parse_specs",
    "spec_hyperparameters",
    "split_specs",
]

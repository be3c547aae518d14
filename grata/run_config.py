"""The `config` block a run records: enough to reproduce it from its report alone."""

from __future__ import annotations

from pathlib import Path

from grata import __version__
from grata.digest import file_sha256
from grata.export.manifest import load_manifest
from grata.methods.hyperparameters import as_json


def model_identity(artifacts=None, checkpoint_file=None) -> dict:
    """What the run adapted: the artifacts' manifest digest (a manifest dict or a folder)
    or the checkpoint file's SHA-256."""
    if artifacts is not None:
        if not isinstance(artifacts, dict):
            artifacts = load_manifest(Path(artifacts), verify=False)
        return {"artifacts_manifest_sha256": artifacts["manifest_sha256"],
                "arch": artifacts["arch"]}
    return {"checkpoint_sha256": file_sha256(checkpoint_file)}


def run_config(*, seed: int, size: int, engine: str, device: str, methods: dict,
               artifacts=None, checkpoint_file=None, norm=None, specs=None, gate=None,
               **extra) -> dict:
    """The config block: package version, model identity (`artifacts`: a manifest or an
    artifact folder, else `checkpoint_file`: its digest),
    seed, size, engine, device, methods (spec keys) with their full hyperparameters, and
    `extra` fields (protocol, predictor, ...).

    With `norm` (the run's default statistics rule) and `specs` (`grata.specs.RunSpec`s):
    ``norm`` and ``norms`` ({key: the rule it ran under}); with `gate` (a
    `grata.gate.GateConfig`): ``gate``, its settings."""
    out = {"grata_version": __version__, **model_identity(artifacts, checkpoint_file),
           "seed": int(seed), "size": int(size), "engine": engine, "device": device,
           "methods": {m: as_json(hp) for m, hp in methods.items()}}
    if norm is not None:
        out["norm"] = str(norm)
    if specs is not None:
        out["norms"] = {s.key: str(s.norm) for s in specs}
    if gate is not None:
        out["gate"] = gate.as_json()
    return {**out, **extra}

"""The embedded default: a synthetic benchmark made on first use and the shipped model."""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from grata import synth, synth_whole
from grata.cache import cache_dir
from grata.disc_scale import read_sidecar

SYNTH_SEED = 0
DEFAULT_ARCH = "edge"
DEFAULT_SIZE = 128
CHECKPOINT_NAME = "edge_synth.pt"




def checkpoint() -> Path:
    """The shipped source checkpoint (edge ResUnet trained on the synthetic source)."""
    return Path(str(resources.files("grata") / "assets" / CHECKPOINT_NAME))


def disc_scale():
    """The shipped checkpoint's disc scale (`grata.disc_scale.DiscScale`, measured on the
    synthetic source's training masks; kept beside it as ``<checkpoint>.scale.json``),
    None when the sidecar is absent."""
    return read_sidecar(checkpoint())


def synthetic_root(progress: bool = True) -> Path:
    """The synthetic benchmark of crops (`grata.synth`), generated once into the cache."""
    return _generated(f"synth-v{synth.VERSION}-seed{SYNTH_SEED}", synth.generate, progress)


def whole_root(progress: bool = True) -> Path:
    """The synthetic whole-photograph benchmark (`grata.synth_whole`), generated once into
    the cache."""
    return _generated(f"synth-whole-v{synth_whole.VERSION}.{synth.VERSION}-seed{SYNTH_SEED}",
                      synth_whole.generate_whole, progress)


def _generated(name: str, generate, progress: bool) -> Path:
    """cache_dir()/name, written by `generate(folder, seed=, progress=)` beside it and
    renamed into place, so a reader never sees a half-written benchmark."""
    root = cache_dir() / name
    if (root / "synth.json").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{name}-"))
    try:
        generate(tmp, seed=SYNTH_SEED, progress=progress)
        try:
            tmp.rename(root)
        except OSError:  # another process finished first: theirs is identical
            if not (root / "synth.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root

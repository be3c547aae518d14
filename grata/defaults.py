"""The embedded default: a synthetic benchmark made on first use and the shipped model."""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

SYNTH_SEED = 0
DEFAULT_ARCH = "edge"
DEFAULT_SIZE = 128
CHECKPOINT_NAME = "edge_synth.pt"


def cache_dir() -> Path:
    """Where generated data and exported artifacts live ($GRATA_CACHE or ~/.cache/grata)."""
    root = os.environ.get("GRATA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "grata")
    return Path(root)


def checkpoint() -> Path:
    """The shipped source checkpoint (edge ResUnet trained on the synthetic source)."""
    return Path(str(resources.files("grata") / "assets" / CHECKPOINT_NAME))


def synthetic_root(progress: bool = True) -> Path:
    """The synthetic benchmark, generated once into the cache (atomically)."""
    from .synth import VERSION
    root = cache_dir() / f"synth-v{VERSION}-seed{SYNTH_SEED}"
    if (root / "synth.json").exists():
        return root
    from .synth import generate
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".synth-"))
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


def whole_root(progress: bool = True) -> Path:
    """The synthetic whole-photograph benchmark (`grata.synth_whole`), generated once into
    the cache (atomically)."""
    from .synth import VERSION as CAMERA_VERSION
    from .synth_whole import VERSION, generate_whole
    root = cache_dir() / f"synth-whole-v{VERSION}.{CAMERA_VERSION}-seed{SYNTH_SEED}"
    if (root / "synth.json").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".synth-whole-"))
    try:
        generate_whole(tmp, seed=SYNTH_SEED, progress=progress)
        try:
            tmp.rename(root)
        except OSError:  # another process finished first: theirs is identical
            if not (root / "synth.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root

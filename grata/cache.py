"""Where the package keeps what it makes: generated data, exported artifacts, compiled
kernels. A module of its own so that the kernels can ask without loading the benchmark."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where generated data and exported artifacts live ($GRATA_CACHE or ~/.cache/grata)."""
    root = os.environ.get("GRATA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "grata")
    return Path(root)


__all__ = ["cache_dir"]

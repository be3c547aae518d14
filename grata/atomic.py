"""Crash-safe file writes: a temp file in the same folder, fsync, rename, fsync the folder.

After a crash a path holds its old content or its new content, never a part of either.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(folder) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path, data: bytes) -> None:
    """Write `data` to `path` through a fsynced temp file and a rename (then fsync the
    folder): after a crash the path holds the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o644)  # mkstemp makes 0600; results are for other readers too
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_temp_files(folder) -> int:
    """Delete the temp files `write_atomic` leaves in `folder` when killed mid-write."""
    n = 0
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                p.unlink(missing_ok=True)
                n += 1
    return n

"""An output folder checked before any work: a run must not fail at its first write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from grata.errors import GrataError


def check_out_dir(path, what: str = "--out") -> Path:
    """Check, before any work, that the output folder `path` can be written: an existing
    folder by writing and removing a probe file in it; a new one by its nearest existing
    parent being a writable folder (nothing is created). An existing file, a path under
    a file, or a folder that cannot be written is a `GrataError` (one line)."""
    path = Path(path)
    where = f"{what} {str(path)!r}"
    if path.exists() and not path.is_dir():
        raise GrataError(f"{where} exists and is not a folder")
    if path.is_dir():
        try:
            fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe.")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise GrataError(f"{where} is not writable ({exc.strerror or exc})") from None
        return path
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise GrataError(f"{where} cannot be created: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GrataError(f"{where} cannot be created: {str(parent)!r} is not writable")
    return path

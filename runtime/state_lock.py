"""Exclusive advisory locks: one server per inbox and per state folder."""

from __future__ import annotations

import os

from grata.errors import GrataError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None


def exclusive_lock(path, busy: str, folder: bool = False) -> int:
    """An exclusive advisory lock (flock) on `path` (a lock file, made if missing, or
    with `folder` an existing folder itself), held until the returned descriptor is
    closed; GrataError(`busy`) when another process holds it, or one line when the path
    cannot be opened."""
    flags = os.O_RDONLY if folder else os.O_RDWR | os.O_CREAT
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise GrataError(f"cannot lock {path}: {exc.strerror or type(exc).__name__}") \
            from None
    if fcntl is None:  # no advisory locks on this platform
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise GrataError(busy) from None
    return fd


__all__ = ["exclusive_lock"]

"""SHA-256 digests of files, bytes and arrays: one implementation for every record."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(Path(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    """Hex SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def array_sha256(a) -> str:
    """Hex SHA-256 of an array's float32 bytes (C order)."""
    return bytes_sha256(np.ascontiguousarray(np.asarray(a), dtype=np.float32).tobytes())

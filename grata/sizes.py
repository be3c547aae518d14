"""The input sizes a model takes: one rule for the export, the training and the runs."""

from __future__ import annotations

from grata.errors import GrataError

SIZE_STEP = 32   # the encoder halves the size five times
MIN_SIZE = 64    # at 32 the bottleneck is 1x1 and per-image BN statistics are undefined


def check_size(size, what: str = "--size") -> int:
    """`size` if it is a multiple of 32 and at least 64, else a one-line GrataError."""
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE \
            or size % SIZE_STEP:
        raise GrataError(f"{what} must be a multiple of {SIZE_STEP}, at least {MIN_SIZE} "
                         f"(got {size!r})")
    return size

"""The process heap kept for the next image (glibc): large buffers come from the heap
instead of fresh mappings, and freed memory is not handed back to the kernel.

Why: a gradient graph frees and allocates the same few hundred megabytes on every image.
With glibc's defaults every buffer above the mmap threshold (at most 32 MiB) is a new
mapping and the heap top is trimmed after each graph, so each image page-faults all of it
again, a page at a time, in the kernel. Keeping the heap removes them (ResNet-34 512x512, two threads: 2.36 ->
1.98 s per image, BENCHMARKS.md); the memory the process holds after a peak stays at
that peak, as an arena's would.
"""

from __future__ import annotations

import ctypes
import platform

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# free memory at the heap top above this goes back to the kernel: far above any image
KEEP_TRIM_BYTES = 1 << 30
_STATE: dict = {}


def keep_heap() -> bool:
    """Set this process's glibc malloc to keep its heap (no mmap for large buffers, trim
    only above 1 GiB of free top). Once per process; True when it is in effect, False on
    a C library without mallopt (musl, macOS, Windows), where nothing changes."""
    if "kept" not in _STATE:
        _STATE["kept"] = _mallopt({M_MMAP_MAX: 0, M_TRIM_THRESHOLD: KEEP_TRIM_BYTES})
    return _STATE["kept"]


def heap_kept() -> bool:
    """Whether `keep_heap` took effect in this process."""
    return bool(_STATE.get("kept"))


def _mallopt(settings: dict[int, int]) -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in settings.items())


__all__ = ["KEEP_TRIM_BYTES", "heap_kept", "keep_heap"]

"""The kept heap: a large buffer freed and asked for again is not faulted in again, and
the engine's sessions set it up (glibc only; checked by the kernel's own fault count)."""

import json
import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocate, touch and free 64 MiB twice; report the minor page faults of the second
# round. glibc's own setting maps so large a buffer afresh each time (64 MiB / 4 KiB =
# 16384 faults); the kept heap hands back the pages of the first round.
PROBE = """
import ctypes, json, resource, sys
sys.path[:0] = {path!r}
if {keep}:
    from grata.runtime.heap import keep_heap, heap_kept
    assert keep_heap() and heap_kept()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def round_(n=64 << 20):  # malloc itself (numpy may ask for huge pages, faulting less)
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def _second_round_faults(keep: bool) -> int:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}  # glibc's own thresholds
    out = subprocess.run([sys.executable, "-c", PROBE.format(path=sys.path, keep=keep)],
                         capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the kept heap is a glibc setting (mallopt)")
def test_kept_heap_does_not_fault_a_freed_buffer_again():
    assert _second_round_faults(keep=False) > 8000  # 16384 pages mapped afresh
    assert _second_round_faults(keep=True) < 500


@pytest.mark.skipif(not GLIBC, reason="the kept heap is a glibc setting (mallopt)")
def test_engine_sessions_keep_the_heap_unless_told_not_to(edge64):
    _, folder = edge64
    code = f"""
import sys
sys.path[:0] = {sys.path!r}
from grata.runtime import OrtEngine
from grata.runtime.heap import heap_kept
OrtEngine({str(folder)!r}, threads=1, tuning={{"heap": sys.argv[1]}})
print(heap_kept())
"""
    for setting, kept in (("keep", "True"), ("system", "False")):
        out = subprocess.run([sys.executable, "-c", code, setting], capture_output=True,
                             text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == kept


def test_keep_heap_is_a_no_op_without_glibc(monkeypatch):
    from grata.runtime import heap
    monkeypatch.setattr(heap.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert heap._mallopt({heap.M_MMAP_MAX: 0}) is False

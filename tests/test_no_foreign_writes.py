"""Nothing the project does while adapting with the onnx engine writes outside the places
the user chose: with GRATA_CACHE and HOME set to empty folders, HOME stays empty
(onnxruntime's device-id/telemetry folder under the user's cache included)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")

CODE = """
import numpy as np
from grata.runtime import OrtEngine
from grata.methods import create
e = OrtEngine({art!r}, threads=1)
m = create("grata", e, seed=0)
x = np.random.default_rng(0).random((1, 3, e.size, e.size), dtype=np.float32)
m.adapt(x, image=x[0])
"""


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("ort_first", [False, True])
def test_engine_writes_nothing_under_home(edge64, tmp_path, ort_first):
    _, art = edge64
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    cache.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_CACHE_HOME", "ORT_DISABLE_TELEMETRY")}
    env.update(HOME=str(home), GRATA_CACHE=str(cache), OMP_NUM_THREADS="1")
    # ort_first: the program imports onnxruntime itself, then grata (too late for grata's
    # default), so it sets the documented variable itself, as the README says
    code = CODE.format(art=str(art))
    if ort_first:
        env["ORT_DISABLE_TELEMETRY"] = "1"
        code = "import onnxruntime\n" + code
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=tmp_path)
    assert _files(home) == []


def test_the_telemetry_switch_is_what_keeps_home_clean(tmp_path):
    """The reference: plain onnxruntime, imported without the switch, does write there
    (skipped where this onnxruntime writes nothing anyway)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_CACHE_HOME", "ORT_DISABLE_TELEMETRY")}
    env["HOME"] = str(home)
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env, check=True)
    if not _files(home):
        pytest.skip("this onnxruntime writes nothing under the user's cache folder")
    assert any("onnxruntime" in f for f in _files(home))

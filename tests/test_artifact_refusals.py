"""Hostile artifact folders: theta0 that is a pickle, junk, another dtype or shape, or not
finite is one line (even when the digests were recomputed), from the API and the CLI."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
from grata.export import load_manifest
from grata.export.manifest import load_theta0, write_manifest

from grata.cli import main
from grata.errors import GrataError
from grata.synth import SOURCE_DOMAIN, generate

pytest.importorskip("onnxruntime")


def _with_theta0(art, folder, write):
    d = shutil.copytree(art, folder)
    write(d / "theta0.npy")
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").unlink()
    write_manifest(d, {k: v for k, v in m.items()
                       if k not in ("format_version", "sha256", "manifest_sha256")})
    return d


def _cases(n):
    good = np.zeros(n, np.float32)
    obj = np.array([{"a": 1}] * n, dtype=object)
    nan = good.copy()
    nan[3] = np.nan
    inf = good.copy()
    inf[-1] = -np.inf
    return {
        "object": (lambda p: np.save(p, obj, allow_pickle=True), "float32 .npy"),
        "pickle": (lambda p: p.write_bytes(pickle.dumps(list(good))), "float32 .npy"),
        "junk": (lambda p: p.write_bytes(b"\x93NUMPY junk" * 3), "float32 .npy"),
        "empty": (lambda p: p.write_bytes(b""), "float32 .npy"),
        "float64": (lambda p: np.save(p, good.astype(np.float64)), "float64"),
        "shape": (lambda p: np.save(p, good[:-1]), "shape"),
        "2d": (lambda p: np.save(p, good[None]), "shape"),
        "nan": (lambda p: np.save(p, nan), "NaN"),
        "inf": (lambda p: np.save(p, inf), "NaN or infinite"),
    }


def test_bad_theta0_is_one_line_before_any_session(edge64, tmp_path):
    from grata.runtime import OrtEngine
    _, art = edge64
    n = load_manifest(art)["n_theta"]
    np.testing.assert_array_equal(load_theta0(art, load_manifest(art)),
                                  np.load(art / "theta0.npy"))
    for name, (write, words) in _cases(n).items():
        d = _with_theta0(art, tmp_path / name, write)
        for call in (lambda d=d: load_manifest(d), lambda d=d: OrtEngine(d, verify=False)):
            with pytest.raises(GrataError) as err:
                call()
            msg = str(err.value)
            assert "\n" not in msg and "theta0.npy" in msg and words in msg, (name, msg)


def test_bad_theta0_through_the_cli_is_exit_2(edge64, tmp_path, capsys):
    _, art = edge64
    generate(tmp_path / "data", seed=3, n_source=(1, 1), n_target=(1, 1), size=64,
             progress=False)
    n = load_manifest(art)["n_theta"]
    for name in ("object", "junk"):
        d = _with_theta0(art, tmp_path / name, _cases(n)[name][0])
        rc = main(["adapt", "--data", str(tmp_path / "data"), "--source", SOURCE_DOMAIN,
                   "--artifacts", str(d), "--size", "64", "--checkpoint", str(edge64[0]),
                   "--arch", "edge", "--methods", "bn", "--quiet",
                   "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "theta0.npy" in err, err
        assert "Traceback" not in err

"""The engine's sessions: one mapping of the frozen weights for every graph, the same
answers as sessions that each read the weights file, infer_source and the mixed graphs
opened on first use."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from grata.export import load_manifest
from grata.export.manifest import write_manifest
from grata.runtime import OrtEngine
from grata.runtime.ort_session import engine_sessions, session_options, shared_weights
from grata.runtime.predictors import OrtPredictor

from grata.errors import GrataError
from grata.models import load_checkpoint
from grata.torch_engine import TorchEngine


def _plain(folder, role):
    """A session of one graph on its own (weights read from the file by onnxruntime)."""
    m = load_manifest(folder)
    return ort.InferenceSession(str(folder / m["graphs"][role]), session_options(1),
                                providers=["CPUExecutionProvider"])


def _feeds(size, theta0, seed):
    rng = np.random.default_rng(seed)
    theta = (theta0 * (1 + 0.2 * rng.standard_normal(theta0.size))).astype(np.float32)
    return {"image": rng.random((1, 3, size, size), dtype=np.float32),
            "strong_image": rng.random((1, 3, size, size), dtype=np.float32),
            "theta": theta}


def test_shared_weights_are_the_file_tensors(edge64):
    _, folder = edge64
    m = load_manifest(folder)
    weights = shared_weights(folder, m)
    assert set(weights) == set(m["weights_index"]) and weights
    blob = np.fromfile(folder / m["weights"], dtype=np.uint8)
    for name, e in list(m["weights_index"].items())[:5]:
        n = int(np.prod(e["shape"]))
        ref = blob[e["offset"]:e["offset"] + 4 * n].view(np.float32).reshape(e["shape"])
        np.testing.assert_array_equal(weights[name].numpy(), ref)
    # no copies: the tensors lie in one buffer at the file's own offsets (one mapping)
    first = min(e["offset"] for e in m["weights_index"].values())
    base = min(v.data_ptr() for v in weights.values())
    for name, value in weights.items():
        assert value.data_ptr() - base == m["weights_index"][name]["offset"] - first


def _rel(a, ref):
    return float(np.linalg.norm(np.asarray(a, np.float64) - ref) / np.linalg.norm(ref))


def test_engine_answers_as_separate_sessions(edge64):
    checkpoint, folder = edge64
    engine = OrtEngine(folder, threads=1)
    assert engine.sessions.weights  # the weights were shared
    opened = set(engine.sessions.opened())
    assert opened == {"infer", "entropy_grad", "consistency_grad"}
    assert "infer_source" in engine.sessions and "infer_mix" in engine.sessions
    ref = TorchEngine(load_checkpoint(checkpoint, "edge").double())  # float64 reference
    for seed in range(2):
        feeds = _feeds(engine.size, engine.theta0, seed)
        engine.theta = feeds["theta"]
        ref.assign(ref.theta, feeds["theta"])
        x, xs = feeds["image"], feeds["strong_image"]
        with torch.no_grad():
            r_logits = ref.infer(ref.to_input(x[0])).numpy()
        r_ent = ref.entropy_grad(ref.to_input(x[0]))
        r_con = ref.consistency_grad(ref.to_input(x[0]), ref.to_input(xs[0]))
        r_ent, r_con = [(float(loss), g.numpy()) for loss, g in (r_ent, r_con)]
        # the engine (shared weights, another optimisation level) is as near the float64
        # answer as the graphs run on their own with the plain options (float32 noise)
        plain = _plain(folder, "infer").run(["logits"], {"image": x,
                                                         "theta": feeds["theta"]})[0]
        assert _rel(engine.infer(x), r_logits) <= 3 * _rel(plain, r_logits) + 1e-6
        # a standalone predictor runs the engine's forward graph: the same bits
        predictor = OrtPredictor(folder, threads=1)
        np.testing.assert_array_equal(engine.infer(x), predictor.predict(x, feeds["theta"]))
        plain = _plain(folder, "entropy_grad").run(None, {"image": x,
                                                          "theta": feeds["theta"]})
        got = engine.entropy_grad(x)
        assert abs(got[0] - r_ent[0]) <= 1e-5 * abs(r_ent[0])
        assert _rel(got[1], r_ent[1]) <= 3 * _rel(plain[1], r_ent[1]) + 1e-6
        plain = _plain(folder, "consistency_grad").run(None, feeds)
        got = engine.consistency_grad(x, xs)
        assert abs(got[0] - r_con[0]) <= 1e-5 * abs(r_con[0])
        assert _rel(got[1], r_con[1]) <= 3 * _rel(plain[1], r_con[1]) + 1e-6
        src = _plain(folder, "infer_source").run(["logits"], {"image": x,
                                                              "theta": feeds["theta"]})
        np.testing.assert_allclose(engine.infer(x, norm="source"), src[0], rtol=1e-4,
                                   atol=1e-4)
        mix_feeds = {"image": x, "theta": feeds["theta"], "stats": engine.stats0,
                     "alpha": np.array([0.3], np.float32)}
        plain = _plain(folder, "entropy_grad_mix").run(None, mix_feeds)
        got = engine.entropy_grad(x, norm="mix:0.3")
        np.testing.assert_allclose(got[0], plain[0], rtol=1e-5)
        assert _rel(got[1], np.asarray(plain[1], np.float64)) <= 1e-4
    assert set(engine.sessions.opened()) == opened | {"infer_source", "entropy_grad_mix"}


def test_folder_without_weight_index_loads_per_session(edge64, tmp_path):
    _, src = edge64
    folder = tmp_path / "art"
    shutil.copytree(src, folder)
    fields = json.loads((folder / "manifest.json").read_text())
    for key in ("format_version", "sha256", "manifest_sha256", "weights_index"):
        fields.pop(key)
    (folder / "manifest.json").unlink()
    m = write_manifest(folder, fields)
    assert shared_weights(folder, m) is None
    engine = OrtEngine(folder, threads=1)
    assert engine.sessions.weights is None
    feeds = _feeds(engine.size, engine.theta0, 5)
    ref = _plain(src, "entropy_grad").run(None, {"image": feeds["image"],
                                                 "theta": engine.theta})
    loss, grad = engine.entropy_grad(feeds["image"])
    np.testing.assert_allclose(loss, ref[0], rtol=1e-5)
    assert np.linalg.norm(grad - ref[1]) <= 1e-4 * np.linalg.norm(ref[1])


def test_unknown_setting_is_refused(edge64):
    _, folder = edge64
    with pytest.raises(GrataError, match="unknown onnx option"):
        engine_sessions(folder, load_manifest(folder), threads=1, tuning={"arenas": "1"})


@pytest.mark.parametrize("key,values", [("arena", ("0", "shared")),
                                        ("order", ("priority", "default"))])
def test_memory_settings_change_nothing_but_memory(edge64, key, values):
    _, folder = edge64
    m = load_manifest(folder)
    feeds = _feeds(m["size"], np.load(folder / m["theta0"]), 3)
    grad_feeds = {k: feeds[k] for k in ("image", "theta")}
    outs = []
    for value in values:
        sessions = engine_sessions(folder, m, threads=1, tuning={key: value})
        outs.append([sessions["entropy_grad"].run(None, grad_feeds)[1],
                     sessions["consistency_grad"].run(None, feeds)[1]])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)

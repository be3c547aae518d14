"""Serving under a statistics rule (mix, ema) and with the safety gate: the prediction,
the state round trip (stream statistics included), crash recovery, the records."""

import json
import subprocess
import sys

import numpy as np
import pytest
from grata.runtime import OrtEngine
from grata.runtime.adaptive import AdaptiveModel
from grata.runtime.predictors import EnginePredictor
from serve_helpers import load_state, make_inbox, serve_args

from grata.cli import main
from grata.decode import load_image
from grata.gate import GateConfig
from grata.methods import create

OPTS = {"predictor": "onnxruntime", "device": "cpu", "threads": 1}


@pytest.fixture(scope="module")
def artifacts(edge64):
    return edge64[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eyes")
    names = make_inbox(folder, 6, seed=5)
    return [load_image(folder / n, 64) for n in names]


def reference(artifacts, spec: str, norm: str, images):
    """Logits, theta and stream statistics after each image from the method itself over
    its own engine (no serving code), in one uninterrupted run."""
    method = create(spec, OrtEngine(artifacts, threads=1), norm=norm, seed=0)
    out = []
    for img in images:
        logits = method.adapt(method.engine.to_input(img), image=img)
        stats = None if method.engine.stats is None else method.engine.stats.copy()
        out.append((np.asarray(logits).copy(), method.engine.theta.copy(), stats))
    return out


def test_mixed_rule_serves_the_mixed_prediction(artifacts, images):
    ref = reference(artifacts, "grata", "mix:0.3", images[:3])
    with AdaptiveModel(artifacts, None, method="grata@mix:0.3", **OPTS) as s:
        assert isinstance(s.predictor, EnginePredictor)
        for img, (logits, theta, _) in zip(images, ref):
            res = s.process(img)
            np.testing.assert_allclose(res["logits"], logits, rtol=0, atol=1e-6)
            np.testing.assert_array_equal(s.theta, theta)
        rec = res["record"]
        assert rec["method"] == "grata@mix:0.3" and rec["norm"] == "mix:0.3"
        assert s.config["norms"] == {"grata@mix:0.3": "mix:0.3"}
    # a plain name takes norm=, and the rule really changes the prediction
    with AdaptiveModel(artifacts, None, method="grata", norm="mix:0.3", **OPTS) as s:
        np.testing.assert_allclose(s.process(images[0])["logits"], ref[0][0], atol=1e-6)
    with AdaptiveModel(artifacts, None, method="grata", **OPTS) as s:
        assert np.abs(s.process(images[0])["logits"] - ref[0][0]).max() > 1e-3


def test_tensorrt_with_a_mixed_rule_is_one_line(artifacts, tmp_path, capsys):
    make_inbox(tmp_path / "in", 1)
    rc = main(serve_args(tmp_path / "in", tmp_path / "out", artifacts, "--once",
                         "--norm", "mix:0.2", "--predictor", "tensorrt"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "tensorrt predictor serves sample and source" in err
    assert len(err.splitlines()) == 1


def test_ema_kill_and_resume_equals_an_uninterrupted_run(artifacts, images, tmp_path):
    ref = reference(artifacts, "tent", "ema:0.2", images)
    state = tmp_path / "state"
    s = AdaptiveModel(artifacts, state, method="tent@ema:0.2", **OPTS)
    served = [s.process(img) for img in images[:3]]
    st = load_state(state)
    np.testing.assert_array_equal(st["stats"], ref[2][2])  # the stream statistics saved
    assert not np.array_equal(st["stats"], s.engine.stats0)
    s._unlock()  # killed: no exit checkpoint
    with AdaptiveModel(artifacts, state, method="tent@ema:0.2", **OPTS) as s2:
        np.testing.assert_array_equal(s2.engine.stats, ref[2][2])
        # the last image again (crash between checkpoint and outputs): its own prediction,
        # at the statistics it was served at, and the stream does not move
        again = s2.recover(images[2])
        np.testing.assert_array_equal(again["logits"], served[2]["logits"])
        np.testing.assert_array_equal(s2.engine.stats, ref[2][2])
        for img, (logits, theta, stats) in zip(images[3:], ref[3:]):
            np.testing.assert_allclose(s2.process(img)["logits"], logits, rtol=0, atol=1e-6)
            np.testing.assert_array_equal(s2.theta, theta)
            np.testing.assert_array_equal(s2.engine.stats, stats)
    for res, (logits, _, _) in zip(served, ref):
        np.testing.assert_allclose(res["logits"], logits, rtol=0, atol=1e-6)
    # a state of another rule is refused
    from grata.errors import GrataError
    with pytest.raises(GrataError, match="ema:0.2 statistics, not sample"):
        AdaptiveModel(artifacts, state, method="tent", **OPTS)


def test_gate_serves_the_chosen_prediction_and_records_why(artifacts, images, tmp_path):
    with AdaptiveModel(artifacts, None, method="source", **OPTS) as src, \
            AdaptiveModel(artifacts, None, method="bn", **OPTS) as plain:
        source = [src.process(img)["logits"] for img in images]
        adapted = [plain.process(img)["logits"] for img in images]
    # margin -1: the source wins every comparison it is not implausible for
    with AdaptiveModel(artifacts, tmp_path / "state", method="bn+gate",
                       gate=GateConfig(margin=-1.0), **OPTS) as s:
        for img, ls, la in zip(images, source, adapted):
            rec = s.process(img)
            g = rec["record"]["gate"]
            assert g["chosen"] in ("adapted", "source") and g["reason"]
            assert g["extra_forwards"] == 3
            for who in ("adapted", "source"):
                assert set(g[who]) == {"implausible", "agreement", "entropy"}
            if g["chosen"] == "source":
                np.testing.assert_array_equal(rec["logits"], ls)
            else:
                assert g["reason"].startswith("source implausible")
                np.testing.assert_array_equal(rec["logits"], la)
            assert "gate" in rec["record"]["timings_ms"]
        window = s.gate.state()
    assert json.loads(str(load_state(tmp_path / "state")["gate"])) == window
    with AdaptiveModel(artifacts, tmp_path / "state", method="bn+gate",
                       gate=GateConfig(margin=-1.0), **OPTS) as s2:
        assert s2.gate.state() == window


def test_serve_with_the_gate_and_a_mixed_rule_imports_no_torch(artifacts, tmp_path):
    inbox, outbox = tmp_path / "in", tmp_path / "out"
    make_inbox(inbox, 2)
    args = serve_args(inbox, outbox, artifacts, "--once", "--quiet",
                      "--method", "grata@mix:0.2+gate")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from grata.cli import main\n"
            f"rc = main({args!r})\n"
            "assert rc == 0, rc\n"
            "assert not [m for m in sys.modules if m.startswith('torch')"
            " and sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    records = [json.loads(p.read_text()) for p in outbox.glob("*.json")]
    assert len(records) == 2
    for rec in records:
        assert rec["method"] == "grata@mix:0.2+gate" and rec["norm"] == "mix:0.2"
        assert rec["gate"]["chosen"] in ("adapted", "source")
    config = json.loads((outbox / ".state" / "config.json").read_text())
    assert config["gate"]["views"] == ["hflip"] and config["norms"] == {
        "grata@mix:0.2+gate": "mix:0.2"}

"""The adaptive model: drift and finite guards, refused states, its state and config."""

import json

import numpy as np
import pytest
from grata.runtime.adaptive import AdaptiveModel
from grata.runtime.record import theta_digest
from grata.runtime.state_file import STATE_FILE
from serve_helpers import load_state, make_inbox

from grata.errors import DataError, GrataError


@pytest.fixture(scope="module")
def artifacts(edge64):
    return edge64[1]


def test_drift_bound_resets_and_is_logged(artifacts, tmp_path):
    names = make_inbox(tmp_path, 2)
    with AdaptiveModel(artifacts, None, predictor="onnxruntime", device="cpu", threads=1,
                 max_drift=1e-9) as s:
        for n in names:
            rec = s.process(tmp_path / n)["record"]
            (reset,) = rec["resets"]
            assert reset["reason"] == "drift" and reset["drift"] > reset["max_drift"] == 1e-9
            assert "last good theta" in reset["action"]
            assert rec["theta_drift"] == 0 and rec["theta_version"] == 0
        assert np.array_equal(s.theta, s.engine.theta0) and s.method.steps == 0


def test_non_finite_guards_restore_the_last_good_theta(artifacts, tmp_path):
    names = make_inbox(tmp_path, 3)
    with AdaptiveModel(artifacts, None, predictor="onnxruntime", device="cpu", threads=1) as s:
        s.process(tmp_path / names[0])
        good = s.theta
        real = s.engine.entropy_grad
        s.engine.entropy_grad = lambda x: (float("nan"), real(x)[1] * np.nan)
        rec = s.process(tmp_path / names[1])["record"]
        s.engine.entropy_grad = real
        assert rec["resets"][0]["reason"] == "non-finite"
        assert np.array_equal(s.theta, good) and rec["theta_version"] == 1

        predict = s.predictor.predict
        calls = []

        def flaky(x, theta):  # non-finite at the adapted theta only
            calls.append(theta_digest(theta))
            out = predict(x, theta)
            return out * np.nan if len(calls) == 1 else out

        s.predictor.predict = flaky
        rec = s.process(tmp_path / names[2])["record"]
        assert [r["reason"] for r in rec["resets"]] == ["non-finite prediction"]
        assert calls[1] == theta_digest(good) == rec["theta_sha256"]
        assert np.array_equal(s.theta, good) and s.method.steps == 1
        with pytest.raises(DataError, match="not finite"):
            s.predictor.predict = lambda x, theta: predict(x, theta) * np.nan
            s.process(tmp_path / names[2])


def test_state_of_other_artifacts_or_method_is_refused(artifacts, tmp_path, capsys):
    state = tmp_path / "state"
    AdaptiveModel(artifacts, state, predictor="onnxruntime", device="cpu").close()
    with pytest.raises(GrataError, match="belongs to method 'grata', not 'tent'"):
        AdaptiveModel(artifacts, state, method="tent", predictor="onnxruntime", device="cpu")
    st = load_state(state)
    st["source_sha256"] = np.array("0" * 64)
    np.savez(state / STATE_FILE, **st)
    with pytest.raises(GrataError, match="another source model.*--reset"):
        AdaptiveModel(artifacts, state, predictor="onnxruntime", device="cpu")
    (state / STATE_FILE).write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(GrataError, match="cannot be read.*--reset"):
        AdaptiveModel(artifacts, state, predictor="onnxruntime", device="cpu")
    with AdaptiveModel(artifacts, state, predictor="onnxruntime", device="cpu", reset=True) as s:
        assert s.resumed is None
        with pytest.raises(GrataError, match="in use by another grata serve"):
            AdaptiveModel(artifacts, state, predictor="onnxruntime", device="cpu")


# ------------------------------------------------------------------- state and config

def test_config_records_the_run_and_hyperparameters_reach_the_method(artifacts, tmp_path,
                                                                      capsys):
    from grata.export import load_manifest
    from serve_helpers import serve_args

    from grata.cli import main
    names = make_inbox(tmp_path / "inbox", 2)
    rc = main(serve_args(tmp_path / "inbox", tmp_path / "out", artifacts, "--once", "--quiet",
                         "--seed", "7", "--hp", "grata.beta=0.01", "--hp",
                         "grata.betas=0.5,0.9"))
    assert rc == 0
    state = tmp_path / "out" / ".state"
    config = json.loads((state / "config.json").read_text())
    assert config["methods"] == {"grata": {"beta": 0.01, "betas": [0.5, 0.9], "eps": 1e-8}}
    assert config["artifacts_manifest_sha256"] == load_manifest(artifacts)["manifest_sha256"]
    assert config["seed"] == 7 and config["size"] == 64 and config["engine"] == "onnx"
    assert config["predictor"] == "onnxruntime" and config["device"] == "cpu"
    assert json.loads(str(load_state(state)["config"])) == config
    # the same run in memory from the config alone gives the same theta
    hp = config["methods"]["grata"]
    with AdaptiveModel(artifacts, None, predictor=config["predictor"], device=config["device"],
                       threads=1, seed=config["seed"], hyperparameters=hp) as again:
        for n in names:
            again.process(tmp_path / "inbox" / "processed" / n)
        assert np.array_equal(again.theta, load_state(state)["theta"])
        assert again.method.beta == 0.01 and again.method.betas == (0.5, 0.9)
    with AdaptiveModel(artifacts, None, predictor="onnxruntime", device="cpu", threads=1,
                       seed=7) as default:
        for n in names:
            default.process(tmp_path / "inbox" / "processed" / n)
        assert not np.array_equal(default.theta, load_state(state)["theta"])


def test_serve_hyperparameter_mistake_is_one_line(artifacts, tmp_path, capsys):
    from serve_helpers import serve_args

    from grata.cli import main
    make_inbox(tmp_path / "inbox", 1)
    rc = main(serve_args(tmp_path / "inbox", tmp_path / "out", artifacts, "--once",
                         "--method", "tent", "--hp", "tent.beta=1"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "tent has no hyperparameter 'beta'" in err and "\n" not in err
    assert (tmp_path / "inbox" / "eye000.png").exists()


def test_state_file_holds_the_method_state(artifacts, tmp_path):
    names = make_inbox(tmp_path, 2)
    with AdaptiveModel(artifacts, tmp_path / "state", predictor="onnxruntime", device="cpu",
                       threads=1) as s:
        for n in names:
            s.process(tmp_path / n)
        expected = s.method.state()
    st = load_state(tmp_path / "state")
    for k in ("theta", "m", "v"):
        np.testing.assert_array_equal(st[k], expected[k])
        np.testing.assert_array_equal(st[f"good_{k}"], expected["good"][k])
    assert int(st["t"]) == expected["t"] == 2 and int(st["n_seen"]) == 2
    assert json.loads(str(st["rng"])) == expected["rng"]
    with AdaptiveModel(artifacts, tmp_path / "state", predictor="onnxruntime", device="cpu",
                       threads=1) as s2:
        resumed = s2.method.state()
    for k in ("theta", "m", "v"):
        np.testing.assert_array_equal(resumed[k], expected[k])
    assert resumed["rng"] == expected["rng"] and resumed["good"]["t"] == 2


def test_drift_beyond_the_bound_falls_back_to_the_source_when_the_last_good_is_too_far(
        artifacts, tmp_path):
    """Three unbounded steps move theta; with the bound then set below the current drift,
    the next image's restore target (the state before it) is itself beyond the bound, so
    theta, moments and step return to the source: theta0, zero moments, step 0."""
    names = make_inbox(tmp_path, 4, seed=4)
    with AdaptiveModel(artifacts, None, predictor="onnxruntime", device="cpu", threads=1,
                       max_drift=None) as s:
        for n in names[:3]:
            assert s.process(tmp_path / n)["record"]["resets"] == []
        before = s.drift
        assert before > 0 and s.method.steps == 3
        s.max_drift = before / 2  # the last good theta (drift `before`) is beyond it
        rec = s.process(tmp_path / names[3])["record"]
        (reset,) = rec["resets"]
        assert reset["reason"] == "drift" and reset["max_drift"] == before / 2
        assert reset["drift"] > before / 2
        assert reset["action"].startswith("reset to the source theta")
        theta0 = np.load(artifacts / "theta0.npy").astype(np.float32)
        assert np.array_equal(s.theta, theta0) and rec["theta_drift"] == 0
        st = s.method.state()
        assert not st["m"].any() and not st["v"].any() and st["t"] == 0
        assert rec["step"] == 0 and rec["images_adapted"] == 4


def test_max_drift_0_disables_the_bound(artifacts, tmp_path, capsys):
    from serve_helpers import serve_args

    from grata.cli import main
    names = make_inbox(tmp_path / "a", 3, seed=6)
    make_inbox(tmp_path / "b", 3, seed=6)
    tiny = main(serve_args(tmp_path / "a", tmp_path / "oa", artifacts, "--once", "--quiet",
                           "--max-drift", "1e-9"))
    off = main(serve_args(tmp_path / "b", tmp_path / "ob", artifacts, "--once", "--quiet",
                          "--max-drift", "0"))
    assert tiny == off == 0
    for out, bounded in ((tmp_path / "oa", True), (tmp_path / "ob", False)):
        recs = sorted((json.loads(p.read_text()) for p in out.glob("*.json")),
                      key=lambda r: r["images_adapted"])
        assert [r["image"] for r in recs] == names
        if bounded:  # the bound trips on every image: theta stays the source
            assert all(r["resets"][0]["reason"] == "drift" for r in recs)
            assert all(r["theta_version"] == 0 and r["max_drift"] == 1e-9 for r in recs)
        else:
            assert all(r["resets"] == [] and r["max_drift"] is None for r in recs)
            assert [r["theta_version"] for r in recs] == [1, 2, 3]
            assert recs[-1]["theta_drift"] > 1e-9
    assert json.loads((tmp_path / "ob" / ".state" / "config.json").read_text())[
        "max_drift"] is None


# ------------------------------------------------------------------- state file formats

OPTS = {"predictor": "onnxruntime", "device": "cpu", "threads": 1}


def _format1_state(st: dict, model, n_images: int, last_key: str, old: bool) -> dict:
    """The arrays the first release's writer produced (state format 1), by hand from a
    method state; `old`: as written before n_seen, events and norm existed."""
    arrays = {
        "format_version": np.int64(1), "theta": st["theta"], "m": st["m"], "v": st["v"],
        "t": np.int64(st["t"]), "n_images": np.int64(n_images),
        "theta_version": np.int64(n_images), "rng": np.array(json.dumps(st["rng"])),
        "source_sha256": np.array(model.source_sha256), "method": np.array(st["method"]),
        "seed": np.int64(st["seed"]), "last_key": np.array(last_key),
        "config": np.array(json.dumps(model.config)), "written": np.array("then"),
        "good_theta": st["good"]["theta"], "good_m": st["good"]["m"],
        "good_v": st["good"]["v"], "good_t": np.int64(st["good"]["t"])}
    if not old:
        arrays.update({"n_seen": np.int64(st["n_seen"]),
                       "events": np.array(json.dumps(st["events"])),
                       "norm": np.array("sample")})
    return arrays


@pytest.mark.parametrize("old", [False, True], ids=["format1", "format1-before-counters"])
def test_a_format1_state_resumes_as_an_uninterrupted_run(artifacts, tmp_path, old):
    names = make_inbox(tmp_path / "in", 3, seed=8)
    with AdaptiveModel(artifacts, None, **OPTS) as whole:
        digests = [whole.process(tmp_path / "in" / n)["record"]["theta_sha256"]
                   for n in names]
    with AdaptiveModel(artifacts, None, **OPTS) as first:
        for n in names[:2]:
            first.process(tmp_path / "in" / n)
        st = first.method.state()
        arrays = _format1_state(st, first, 2, names[1], old)
    state = tmp_path / "state"
    state.mkdir()
    np.savez(state / STATE_FILE, **arrays)
    with AdaptiveModel(artifacts, state, **OPTS) as s:
        assert s.resumed["n_images"] == 2 and s.resumed["theta_version"] == 2
        assert s.last_key == names[1] and s.method.steps == 2
        resumed = s.method.state()
        np.testing.assert_array_equal(resumed["theta"], st["theta"])
        np.testing.assert_array_equal(resumed["good"]["v"], st["good"]["v"])
        assert resumed["rng"] == st["rng"] and resumed["n_seen"] == 2
        rec = s.process(tmp_path / "in" / names[2])["record"]
    assert rec["theta_sha256"] == digests[2] and rec["theta_version"] == 3
    written = load_state(state)  # written again in the current format
    assert int(written["format_version"]) == 2 and int(written["n_seen"]) == 3


def test_a_state_of_an_unknown_format_is_refused_in_one_line(artifacts, tmp_path):
    state = tmp_path / "state"
    AdaptiveModel(artifacts, state, **OPTS).close()
    st = load_state(state)
    st["format_version"] = np.int64(7)
    np.savez(state / STATE_FILE, **st)
    with pytest.raises(GrataError) as err:
        AdaptiveModel(artifacts, state, **OPTS)
    assert str(err.value) == (f"state {state / STATE_FILE} has format 7, not 2; pass "
                              f"--reset to start from the source theta")


@pytest.mark.parametrize("spec", ["grata", "tent@ema:0.2+gate"])
def test_the_state_file_speaks_the_method_states_vocabulary(artifacts, tmp_path, spec):
    """The file's keys are Method.state()'s (its guard's ``good`` as good_<key>) and
    serving's own, nothing else."""
    names = make_inbox(tmp_path / "in", 2, seed=3)
    with AdaptiveModel(artifacts, tmp_path / "state", method=spec, **OPTS) as s:
        for n in names:
            s.process(tmp_path / "in" / n)
        st = s.method.state()
    method_keys = {k for k, v in st.items() if v is not None and k != "good"}
    method_keys |= {f"good_{k}" for k in st["good"]}
    serving = {"format_version", "n_images", "theta_version", "last_key", "source_sha256",
               "norm", "config", "written"}
    if s.gate is not None:
        serving |= {"gate", "stats_prev"}  # the gate's window; ema: the served statistics
    assert set(load_state(tmp_path / "state")) == method_keys | serving

"""Method.state() / load_state(): a stream interrupted, saved and restored into a fresh
method continues bit for bit as the uninterrupted stream (onnx and torch engines)."""

import json

import numpy as np
import pytest
from conftest import EDGE_SIZE

from grata.methods import create
from grata.models import load_checkpoint
from grata.runtime import OrtEngine
from grata.torch_engine import TorchEngine


def images(n: int, seed: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((3, EDGE_SIZE, EDGE_SIZE), dtype=np.float32) for _ in range(n)]


def make_engine(kind: str, edge64):
    checkpoint, art = edge64
    if kind == "onnx":
        return OrtEngine(art, threads=1)
    return TorchEngine(load_checkpoint(checkpoint, "edge"))


def run(method, stream) -> list[np.ndarray]:
    e = method.engine
    return [np.array(e.to_numpy(method.adapt(e.to_input(img), image=img))) for img in stream]


def through_json(state: dict) -> dict:
    """The state as a checkpoint would store it: arrays as lists, everything JSON."""
    def plain(v):
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    back = json.loads(json.dumps(plain(state)))
    for k in ("theta", "m", "v"):
        back[k] = np.asarray(back[k], np.float32)
    if back["good"] is not None:
        for k in ("theta", "m", "v"):
            back["good"][k] = np.asarray(back["good"][k], np.float32)
    return back


@pytest.mark.parametrize("kind", ["onnx", "torch"])
@pytest.mark.parametrize("name", ["grata", "tent"])
def test_state_round_trip_continues_bit_for_bit(kind, name, edge64):
    stream = images(5)
    whole = create(name, make_engine(kind, edge64), seed=3)
    expected = run(whole, stream)

    first = create(name, make_engine(kind, edge64), seed=3)
    head = run(first, stream[:2])
    state = through_json(first.state())
    resumed = create(name, make_engine(kind, edge64), seed=3)  # a fresh process, in effect
    resumed.load_state(state)
    tail = run(resumed, stream[2:])
    for a, b in zip(head + tail, expected):
        np.testing.assert_array_equal(a, b)
    e_w, e_r = whole.engine, resumed.engine
    np.testing.assert_array_equal(e_w.to_numpy(e_w.theta), e_r.to_numpy(e_r.theta))
    assert resumed.steps == whole.steps == 5 and resumed.images_seen == 5
    # the state after the stream matches too, field by field
    sw, sr = whole.state(), resumed.state()
    for k in ("theta", "m", "v"):
        np.testing.assert_array_equal(sw[k], sr[k])
    assert sw["rng"] == sr["rng"] and sw["t"] == sr["t"] and sw["n_seen"] == sr["n_seen"]


def test_state_is_a_copy_and_carries_guard_and_events(edge64):
    m = create("grata", make_engine("onnx", edge64), seed=1)
    run(m, images(1))
    m.events.append({"image": 1, "event": "non-finite", "action": "test"})
    st = m.state()
    assert st["good"] is not None and st["good"]["t"] == 1 and st["t"] == 1
    np.testing.assert_array_equal(st["good"]["theta"], st["theta"])
    st["theta"][:] = 0  # changing the copy leaves the method alone
    assert np.any(m.engine.theta != 0)
    other = create("grata", make_engine("onnx", edge64), seed=1)
    other.load_state(m.state())
    assert other.events == m.events and other.images_seen == 1
    other.reset()
    assert other.steps == 0 and other.state()["good"] is None

"""The soak check at CI size: benchmarks/soak_serve.py's run (the console script `grata
serve` in a subprocess) over 40 images with stalled writers, one set of hostile inbox
files and kill -9s; every input must end with exactly one complete result or one
rejection with a reason, as expected for its kind."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "soak_serve.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak_serve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_soak_at_ci_size_loses_and_duplicates_nothing(soak, edge64, tmp_path):
    r = soak.run_soak(tmp_path / "run", edge64[1], images=40, kills=2, stalls=4,
                      hostile_rounds=1, seed=3, stable_for=2.0, drain_timeout=300,
                      log=lambda msg: None)
    assert r["problems"] == [] and r["lost"] == 0 and r["duplicated"] == 0
    assert r["adapted_once"]
    kills = sum(v for k, v in r["faults"].items() if k.startswith("kill -9"))
    assert kills >= 2 and r["server_runs"] == kills + 1 and r["final_rc"] == 0
    assert r["faults"]["stalled writer"] == 4
    # by hand from tests/hostile.py's inbox_files: a good image, a 244-byte name and a
    # newline in a name are served; a non-UTF-8 truncated file, an empty file, text, a
    # 13000x13000 PNG and a truncated JPEG are rejected; the folder is left alone
    assert r["inputs"] == 48 and r["results_out"] == 43 and r["rejections_out"] == 5
    assert r["rejections"]["above the decoding limit"] == 1
    assert r["outcomes"] == {"served": 43, "rejected": 5, "left alone": 1}


def test_soak_check_sees_a_lost_and_a_duplicated_input(soak, tmp_path):
    """The check itself: an input with no outcome is lost, one with two is duplicated."""
    import hashlib
    import json

    from grata.runtime.inbox import display_name

    from grata.decode import quote
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    (inbox / "rejected").mkdir(parents=True)
    outbox.mkdir()
    feed = [{"name": n.encode(), "data": n.encode() * 3, "kind": "image",
             "expect": "served", "src": None} for n in ("a.png", "b.png", "c.png")]
    adapted = iter(range(1, 4))
    for item, copies in zip(feed, (1, 0, 2)):
        sha = hashlib.sha256(item["data"]).hexdigest()
        for k in range(copies):
            (outbox / f"m{k}{item['name'].decode()}").write_bytes(b"x")
            (outbox / f"{item['name'].decode()}.{k}.json").write_text(json.dumps({
                "image": display_name(item["name"].decode()), "input_sha256": sha,
                "recovered": False, "images_adapted": next(adapted), "files": {"mask": f"m{k}{item['name'].decode()}"}}))
    logs = tmp_path / "logs"
    logs.mkdir()
    server = soak.Server([], logs, {})
    r = soak.verify(feed, inbox, outbox, server, quote, display_name)
    assert r["lost"] == 1 and r["duplicated"] == 1 and r["outcomes"]["served"] == 1
    assert len(r["problems"]) == 2 and r["adapted_once"]

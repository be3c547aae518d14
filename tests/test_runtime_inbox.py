"""The crash-safe inbox loop: grata serve end to end on onnxruntime, crash safety (kill -9
at random moments, a crash between checkpoint and outputs), checkpoint spacing, the
watcher, refused artifacts."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from serve_helpers import SIZE, load_state, make_inbox, reference_run, serve_args, temp_files

from grata.cli import main
from grata.runtime.adaptive import STATE_FILE, AdaptiveModel, theta_digest
from grata.runtime.inbox import Watcher, result_key, serve


@pytest.fixture(scope="module")
def artifacts(edge64):
    return edge64[1]


def test_serve_end_to_end_onnxruntime(artifacts, tmp_path, capsys):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    names = make_inbox(inbox, 5)
    (inbox / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (inbox / "writing.png.part").write_bytes(b"not yet")
    (inbox / ".hidden.png").write_bytes(b"not mine")
    ref = reference_run(artifacts, inbox, names)

    assert main(serve_args(inbox, outbox, artifacts, "--once")) == 0
    err = capsys.readouterr().err
    assert "starting from the source theta" in err and "5 served" in err and "1 rejected" in err

    records = []
    for i, name in enumerate(names):
        key = result_key(name, (inbox / "processed" / name).read_bytes())
        rec = json.loads((outbox / f"{key}.json").read_text())
        records.append(rec)
        mask = np.asarray(Image.open(outbox / rec["files"]["mask"]))
        assert mask.shape == (96, 96) and set(np.unique(mask)) <= {0, 128, 255}
        assert Image.open(outbox / rec["files"]["overlay"]).size == (SIZE, SIZE)
        assert rec["disc_area_px"] == int((mask < 255).sum()) > rec["cup_area_px"] > 0
        assert rec["cup_area_px"] == int((mask == 0).sum())
        assert rec["vcdr"] is None or 0 < rec["vcdr"] <= 2
        assert rec["timings_ms"]["adapt"] > 0 and rec["timings_ms"]["predict"] > 0
        assert rec["predictor"] == "onnxruntime" and rec["method"] == "grata"
        # adapted exactly once, in arrival order, as an uninterrupted session would
        assert rec["theta_version"] == rec["images_adapted"] == rec["step"] == i + 1
        assert rec["theta_sha256"] == ref[i] and rec["resets"] == []
        assert 0 < rec["theta_drift"] < rec["max_drift"] and not rec["recovered"]
    assert len(list(outbox.glob("*.json"))) == 5 and not temp_files(outbox)
    assert sorted(p.name for p in (inbox / "processed").iterdir()) == names
    assert sorted(p.name for p in (inbox / "rejected").iterdir()) == [
        "corrupt.png", "corrupt.png.reason.txt"]
    reason = (inbox / "rejected" / "corrupt.png.reason.txt").read_text()
    assert "reason: cannot read image" in reason
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == [".hidden.png",
                                                                     "writing.png.part"]
    state = load_state(outbox / ".state")
    assert theta_digest(state["theta"]) == records[-1]["theta_sha256"]
    assert int(state["n_images"]) == 5 and str(state["last_key"]).startswith("eye004.png.")

    # a restart resumes; an image sent again (same name and content) is not served twice
    shutil.copy(inbox / "processed" / names[0], inbox / names[0])
    new = make_inbox(tmp_path / "more", 1, seed=9)[0]
    shutil.copy(tmp_path / "more" / new, inbox / "late.png")
    assert main(serve_args(inbox, outbox, artifacts, "--once")) == 0
    err = capsys.readouterr().err
    assert f"resumed {outbox / '.state'}: 5 images adapted, theta v5 {ref[-1]}" in err
    assert "1 served" in err and "1 already served" in err
    assert len(list(outbox.glob("*.json"))) == 6
    assert int(load_state(outbox / ".state")["n_images"]) == 6

    # --reset returns to the source theta
    assert main(serve_args(inbox, outbox, artifacts, "--once", "--reset")) == 0
    st = load_state(outbox / ".state")
    assert int(st["n_images"]) == 0
    assert np.array_equal(st["theta"], np.load(artifacts / "theta0.npy"))


def test_kill9_at_random_moments(artifacts, tmp_path):
    """kill -9 during a stream of 30 images, restart, repeat: every image ends with exactly
    one complete result, no partial files, resumed theta = checkpointed theta, and the
    thetas are those of an uninterrupted run (no image adapted twice or skipped)."""
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    names = make_inbox(inbox, 30, seed=1)
    ref = reference_run(artifacts, inbox, names)
    state_dir = outbox / ".state"
    cmd = [sys.executable, "-m", "grata.cli", *serve_args(inbox, outbox, artifacts, "--once")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rnd = random.Random(2)  # 7 kills while serving (after 1-6 images), 1 while starting
    kills = resumes = 0
    for run in range(20):
        before = load_state(state_dir) if (state_dir / STATE_FILE).exists() else None
        log = tmp_path / f"run{run}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            rc = None
            if run < 8:  # kill: sometimes while starting, mostly while serving
                if rnd.random() < 0.2:
                    deadline = time.monotonic() + rnd.uniform(0.05, 0.8)
                else:  # after a random number of images (whatever the machine's speed)
                    target = rnd.randint(1, 6)
                    give_up = time.monotonic() + 120  # a hung server fails, never hangs
                    while proc.poll() is None and not (
                            ("resumed" in log.read_text() or " the source theta" in
                             log.read_text()) and log.read_text().count("\neye") >= target):
                        if time.monotonic() > give_up:
                            proc.kill()
                            proc.wait()
                            pytest.fail(f"server made no progress in 120 s: {log.read_text()}")
                        time.sleep(0.005)
                    deadline = time.monotonic() + rnd.uniform(0.0, 0.06)
                while proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.002)
                rc = proc.poll()
                if rc is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    kills += 1
            else:
                rc = proc.wait(timeout=120)
        text = log.read_text()
        m = re.search(r"resumed .*: (\d+) images adapted, theta v(\d+) ([0-9a-f]{16})", text)
        if m and before is not None:  # the resumed theta is the checkpointed one
            resumes += 1
            assert m.group(3) == theta_digest(before["theta"])
            assert int(m.group(1)) == int(before["n_images"])
        # invariants at every stop: an image is in the inbox or has one complete result
        for name in names:
            in_inbox, done = (inbox / name).exists(), (inbox / "processed" / name).exists()
            assert in_inbox != done, name
            results = list(outbox.glob(f"{name}.*.json"))
            assert len(results) <= 1 and (results or not done), name
            for r in results:  # a JSON exists only complete, and after its pictures
                rec = json.loads(r.read_text())
                assert (outbox / rec["files"]["mask"]).exists()
                assert (outbox / rec["files"]["overlay"]).exists()
        if rc is not None:
            assert rc == 0, text
            break
    else:
        pytest.fail("the server never finished")
    assert kills >= 3 and resumes >= 2
    assert not any((inbox / n).exists() for n in names)
    assert not temp_files(outbox, state_dir, inbox / "rejected")
    records = {}
    for name in names:
        (result,) = outbox.glob(f"{name}.*.json")
        records[name] = json.loads(result.read_text())
        assert records[name]["key"] == result.name[:-len(".json")]
    assert len(list(outbox.glob("*.json"))) == 30
    assert len(list(outbox.glob("*.png"))) == 60
    for i, name in enumerate(names):
        assert records[name]["images_adapted"] == i + 1, name
        assert records[name]["theta_sha256"] == ref[i], name
    st = load_state(state_dir)
    assert int(st["n_images"]) == 30 and int(st["t"]) == 30
    assert theta_digest(st["theta"]) == ref[-1]


def test_crash_between_checkpoint_and_outputs_is_recovered(artifacts, tmp_path):
    inbox, outbox, state = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "state"
    (name,) = make_inbox(inbox, 1)
    data = (inbox / name).read_bytes()
    s = AdaptiveModel(artifacts, state, predictor="onnxruntime", device="cpu", threads=1)
    first = s.process(data, name=name, key=result_key(name, data))  # checkpointed
    s._unlock()  # the process dies here: no outputs, no exit checkpoint
    theta = load_state(state)["theta"]
    with AdaptiveModel(artifacts, state, predictor="onnxruntime", device="cpu", threads=1) as s2:
        counts = serve(inbox, outbox, s2, once=True, poll_s=0.02, log=None)
        assert counts["recovered"] == 1 and counts["served"] == 0
        assert s2.n_images == 1 and np.array_equal(s2.theta, theta)  # not adapted twice
    (res,) = outbox.glob("*.json")
    rec = json.loads(res.read_text())
    assert rec["recovered"] and rec["theta_sha256"] == first["record"]["theta_sha256"]
    assert np.array_equal(np.asarray(Image.open(outbox / rec["files"]["mask"])),
                          first["mask"])


def test_checkpoint_every_n_resumes_from_the_checkpoint(artifacts, tmp_path):
    folder = tmp_path / "img"
    names = make_inbox(folder, 5, seed=3)
    opts = {"predictor": "onnxruntime", "device": "cpu", "threads": 1, "checkpoint_every": 3}
    s = AdaptiveModel(artifacts, tmp_path / "state", **opts)
    digests = [s.process(folder / n)["record"]["theta_sha256"] for n in names]
    st = load_state(tmp_path / "state")
    assert int(st["n_images"]) == 3 and theta_digest(st["theta"]) == digests[2]
    s._unlock()  # killed after image 5: images 4 and 5 have results, the state is 2 behind
    with AdaptiveModel(artifacts, tmp_path / "state", **opts) as s2:
        assert s2.resumed["n_images"] == 3 and theta_digest(s2.theta) == digests[2]
        assert np.array_equal(s2.theta, st["theta"])
        # the generator state came back too: the same images give the same thetas again
        again = [s2.process(folder / n)["record"]["theta_sha256"] for n in names[3:]]
    assert again == digests[3:]
    assert int(load_state(tmp_path / "state")["n_images"]) == 5  # checkpoint on close


def test_artifacts_with_a_changed_byte_are_refused(artifacts, tmp_path, capsys):
    bad = tmp_path / "art"
    shutil.copytree(artifacts, bad)
    blob = bytearray((bad / "weights.bin").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (bad / "weights.bin").write_bytes(bytes(blob))
    make_inbox(tmp_path / "inbox", 1)
    assert main(serve_args(tmp_path / "inbox", tmp_path / "out", bad, "--once")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "weights.bin does not match its sha256" in err
    assert (tmp_path / "inbox" / "eye000.png").exists()


def test_watcher_waits_for_complete_files(tmp_path):
    w = Watcher(tmp_path, settle_s=60)
    (tmp_path / "a.png").write_bytes(b"x" * 10)
    (tmp_path / "b.png.tmp").write_bytes(b"x")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert w.poll() == ([], 2)  # fresh: seen once
    assert w.poll() == ([tmp_path / "a.png"], 1)  # unchanged since the last scan
    with open(tmp_path / "a.png", "ab") as f:
        f.write(b"more")
    assert w.poll() == ([], 2)  # grew: wait again

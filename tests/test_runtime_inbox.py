"""The crash-safe inbox loop: grata serve end to end on onnxruntime, crash safety (kill -9
at random moments, a crash between checkpoint and outputs), checkpoint spacing, the
watcher, refused artifacts."""

import hashlib
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
from grata.runtime.adaptive import AdaptiveModel
from grata.runtime.inbox import Watcher, result_key, serve
from grata.runtime.record import theta_digest
from grata.runtime.state_file import STATE_FILE
from PIL import Image
from serve_helpers import (
    SIZE,
    grata_script,
    load_state,
    make_inbox,
    reference_run,
    serve_args,
    temp_files,
    wait_for,
)

from grata.cli import main


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
    assert "'corrupt.png': rejected: cannot read image" in err
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

                    def served_enough(target=target, log=log, proc=proc):
                        text = log.read_text()
                        return proc.poll() is not None or (
                            ("resumed" in text or " the source theta" in text)
                            and text.count("\n'eye") >= target)
                    wait_for(served_enough, 300, f"{target} images served")
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


# ------------------------------------------------------------- hostile files and faults

def test_safe_names_are_bounded_portable_and_distinct():
    from grata.runtime.inbox import MAX_NAME, safe_name
    assert safe_name("eye000.png") == "eye000.png"  # ordinary names keep their results
    names = ["L" * 240 + ".png", "L" * 241 + ".png", os.fsdecode(b"bad\xff\xfe.png"),
             "new\nline.png", "new_line.png~", "a b.png", "a_b.png ", ".hidden.png",
             "x" * 300, "\u00e9t\u00e9.png", "../up.png"]
    out = [safe_name(n) for n in names]
    assert len(set(out)) == len(out)  # sanitising never merges two names
    for n, s in zip(names, out):
        assert len(s.encode()) <= MAX_NAME and re.fullmatch(r"[A-Za-z0-9._+~-]+", s), (n, s)
        assert not s.startswith(".") and not s.endswith(("~", ".tmp")), s
    assert out[0].endswith(".png") and out[2].startswith("bad__") and out[2].endswith(".png")
    assert safe_name("a_b.png") == "a_b.png" != safe_name("a b.png")


def _expect_hostile(what: str) -> str:
    return "served" if what in ("a good image", "a 244-byte name",
                                "a newline in the name") else "rejected"


def test_hostile_inbox_files_never_stop_the_server(artifacts, tmp_path):
    """The console script over tests/hostile.py's inbox files (a 244-byte name, a
    non-UTF-8 name on a truncated file, a newline in a name, empty, text, 13000x13000,
    truncated JPEG, a folder): every file is served or rejected with a reason, result
    names are bounded, the record keeps the original name, and no name injects a line
    into the log or a reason file."""
    from grata.runtime.inbox import display_name
    from hostile import inbox_files
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    files = inbox_files(inbox)
    good = make_inbox(inbox, 2, seed=5)
    (inbox / "notes.txt").write_text("the operator's note\n")
    proc = subprocess.run([grata_script(), *serve_args(inbox, outbox, artifacts, "--once")],
                          check=False, capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    err = proc.stderr.decode("utf-8")
    assert proc.returncode == 0, err
    lines = err.splitlines()
    # every line is the server's or starts with a quoted name: no injected line
    assert all(ln.startswith(("grata serve:", "'", '"')) for ln in lines), err
    assert "object at 0x" not in err and "Traceback" not in err
    records = {json.loads(p.read_text())["image"]: json.loads(p.read_text())
               for p in outbox.glob("*.json")}
    reasons = [p.read_text() for p in (inbox / "rejected").glob("*.reason.txt")]
    assert all(len(r.splitlines()) == 4 and "object at 0x" not in r for r in reasons)
    for p in list(outbox.iterdir()) + list((inbox / "rejected").iterdir()):
        assert len(os.fsencode(p.name)) <= 160, p.name
    for raw, what in files.items():
        name = os.fsdecode(raw)
        if what == "a folder named like an image":
            assert (inbox / name).is_dir()  # not a file: left alone
            continue
        assert not os.path.lexists(inbox / name), (raw, what)
        if _expect_hostile(what) == "served":
            rec = records[display_name(name)]
            assert rec["input_sha256"] and (outbox / rec["files"]["mask"]).exists(), what
            assert (inbox / "processed" / name).exists()
        else:
            hits = [r for r in reasons if r.startswith(f"image: {quote(name)}\n")]
            assert len(hits) == 1, (raw, what, reasons)
            assert re.search(r"^reason: \S", hits[0], re.MULTILINE)
    assert all(display_name(n) in records for n in good)
    assert any("not an image file" in r for r in reasons)  # notes.txt
    bad = [r for r in reasons if "bad\\udcff\\udcfe.png" in r]
    assert len(bad) == 1 and "cannot read image" in bad[0]
    assert records["new\nline.png"]["key"].startswith("new_line~")
    assert not temp_files(outbox, inbox / "rejected")


def quote(name):
    from grata.decode import quote as q
    return q(name)


class _Faulty:
    """An AdaptiveModel whose process() fails as told for named images."""

    def __init__(self, model, faults):
        self.model, self.faults = model, faults

    def __getattr__(self, item):
        return getattr(self.model, item)

    def process(self, data, *, name=None, key=None):
        fault = self.faults.get(name)
        if fault:
            exc = fault.pop(0)
            if exc is not None:
                raise exc
        return self.model.process(data, name=name, key=key)


def test_unforeseen_and_transient_errors_reject_or_retry_and_the_stream_goes_on(
        artifacts, tmp_path):
    import errno

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    names = make_inbox(inbox, 4, seed=7)
    faults = {names[1]: [RuntimeError("a bug <object at 0xdeadbeef>\nsecond line")],
              names[2]: [OSError(errno.ENOSPC, "No space left on device"), None]}
    lines = []
    with AdaptiveModel(artifacts, tmp_path / "state", predictor="onnxruntime", device="cpu",
                       threads=1) as model:
        counts = serve(inbox, outbox, _Faulty(model, faults), once=True, poll_s=0.02,
                       settle_s=0.1, stable_s=0.0, log=lines.append)
        assert model.n_images == 3  # the failed image left no update behind
    assert counts["served"] == 3 and counts["rejected"] == 1 and counts["retried"] == 1
    assert sorted(p.name for p in (inbox / "processed").iterdir()) == [
        names[0], names[2], names[3]]
    reason = (inbox / "rejected" / f"{names[1]}.reason.txt").read_text()
    assert "RuntimeError: a bug an object second line" in reason
    assert len(reason.splitlines()) == 4 and "0xdeadbeef" not in reason
    assert any(ln.startswith(f"'{names[2]}': will be tried again: OSError: No space")
               for ln in lines)
    assert all("\n" not in ln for ln in lines)


def test_transient_failure_with_once_leaves_the_image_for_a_later_run(artifacts, tmp_path):
    import errno
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    names = make_inbox(inbox, 2, seed=8)
    faults = {names[0]: [OSError(errno.EAGAIN, "Resource temporarily unavailable")] * 5}
    with AdaptiveModel(artifacts, None, predictor="onnxruntime", device="cpu",
                       threads=1) as model:
        import grata.runtime.inbox as inbox_mod
        old, inbox_mod.RETRY_S = inbox_mod.RETRY_S, 0.01
        try:
            counts = serve(inbox, outbox, _Faulty(model, faults), once=True, poll_s=0.02,
                           settle_s=0.1, stable_s=0.0, log=None)
        finally:
            inbox_mod.RETRY_S = old
    assert counts["left"] == 1 and counts["served"] == 1 and counts["rejected"] == 0
    assert (inbox / names[0]).exists() and not (inbox / "rejected" / names[0]).exists()


def test_a_stalled_copy_is_served_not_rejected(artifacts, tmp_path):
    """A writer puts half a PNG under its final name, pauses far longer than the poll
    and settle intervals, then completes it: the image is served, never rejected."""
    import threading
    inbox, outbox, src = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "src"
    inbox.mkdir()
    (name,) = make_inbox(src, 1, seed=11)
    data = (src / name).read_bytes()
    lines, stop = [], threading.Event()
    paused = threading.Event()

    def writer():
        with open(inbox / name, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            paused.wait(1.0)  # the stall: 50 polls and 10 settle intervals
            f.write(data[len(data) // 2:])

    with AdaptiveModel(artifacts, None, predictor="onnxruntime", device="cpu",
                       threads=1) as model:
        t = threading.Thread(target=writer)
        server = threading.Thread(target=serve, args=(inbox, outbox, model), kwargs={
            "poll_s": 0.02, "settle_s": 0.1, "stable_s": 10.0, "stop": stop,
            "log": lines.append})
        t.start()
        server.start()
        try:
            wait_for(lambda: list(outbox.glob("*.json")), 120, "the stalled image's result")
        finally:
            stop.set()
            t.join(30)
            server.join(60)
    assert not server.is_alive()
    (res,) = outbox.glob("*.json")
    assert json.loads(res.read_text())["input_sha256"] == hashlib.sha256(data).hexdigest()
    assert (inbox / "processed" / name).read_bytes() == data
    assert not list((inbox / "rejected").iterdir())
    assert not any("rejected" in ln for ln in lines)


def test_a_truncated_image_is_rejected_once_stable(artifacts, tmp_path):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    (name,) = make_inbox(inbox, 1, seed=12)
    data = (inbox / name).read_bytes()
    (inbox / name).write_bytes(data[: len(data) // 2])  # fresh mtime: not stable yet
    lines = []
    with AdaptiveModel(artifacts, None, predictor="onnxruntime", device="cpu",
                       threads=1) as model:
        counts = serve(inbox, outbox, model, once=True, poll_s=0.02, settle_s=0.1,
                       stable_s=0.3, log=lines.append)
    assert counts["rejected"] == 1 and counts["served"] == 0
    assert (inbox / "rejected" / name).read_bytes() == data[: len(data) // 2]
    assert "cannot read image" in (inbox / "rejected" / f"{name}.reason.txt").read_text()


def test_sigterm_checkpoints_and_a_second_server_on_the_inbox_is_refused(artifacts, tmp_path):
    """`grata serve` (the console script) serves 3 images with checkpoints only every 1000
    images; a second server on the same inbox is refused in one line (exit 2); SIGTERM
    then writes the final checkpoint: the state on disk holds the theta of the last
    record."""
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    names = make_inbox(inbox, 3, seed=13)
    log = tmp_path / "a.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([grata_script(), *serve_args(
            inbox, outbox, artifacts, "--checkpoint-every", "1000")], stdout=f,
            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(list((inbox / "processed").glob("*.png"))) == 3
                 if (inbox / "processed").is_dir() else False, 300, "3 images served", proc)
        second = subprocess.run([grata_script(), *serve_args(
            inbox, tmp_path / "outbox2", artifacts, "--once")], check=False,
            capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1 and "watched by another grata serve" in \
            second.stderr, second.stderr
        assert not (tmp_path / "outbox2" / ".state").exists()  # refused before any work
        st = load_state(outbox / ".state")
        assert int(st["n_images"]) == 0  # only the fresh state so far
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    key = result_key(names[2], (inbox / "processed" / names[2]).read_bytes())
    last = json.loads((outbox / f"{key}.json").read_text())
    st = load_state(outbox / ".state")
    assert int(st["n_images"]) == 3 and str(st["last_key"]) == last["key"]
    assert theta_digest(st["theta"]) == last["theta_sha256"]


def test_outbox_mistakes_are_one_line_before_any_work(artifacts, tmp_path, capsys,
                                                      monkeypatch):
    import errno
    import tempfile
    inbox = tmp_path / "inbox"
    make_inbox(inbox, 1)
    (tmp_path / "afile").write_text("x")
    cases = [(inbox, "must not be the inbox"),
             (tmp_path / "link", "must not be the inbox"),
             (tmp_path / "afile" / "out", "cannot be made")]
    (tmp_path / "link").symlink_to(inbox)
    for outbox, words in cases:
        assert main(serve_args(inbox, outbox, artifacts, "--once")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        writable = os.access(ro, os.W_OK)  # root writes anyway: the filesystem refuses
        if writable:
            real = tempfile.mkstemp

            def refuse(*a, dir=None, **k):
                if dir is not None and os.path.samefile(dir, ro):
                    raise OSError(errno.EROFS, "Read-only file system")
                return real(*a, dir=dir, **k)
            monkeypatch.setattr(tempfile, "mkstemp", refuse)
        assert main(serve_args(inbox, ro, artifacts, "--once")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"outbox {quote(ro)} is not writable" in err, err
    finally:
        ro.chmod(0o755)
    assert not list(ro.iterdir()) and (inbox / "eye000.png").exists()
    assert main(serve_args(inbox, tmp_path / "o", artifacts, "--once", "--max-drift",
                           "-1")) == 2
    assert "--max-drift must be" in capsys.readouterr().err


def test_after_a_crash_the_image_the_state_holds_is_served_before_older_arrivals(
        artifacts, tmp_path):
    """Killed between the checkpoint of image X and its outputs; meanwhile an image Y
    with an older modification time (e.g. a copy that keeps its original time) is in the
    inbox. X must be recovered (predicted at the checkpointed theta, not adapted again)
    before Y is adapted: every image adapted exactly once."""
    inbox, outbox, state = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "state"
    older, name = make_inbox(inbox, 2, seed=14)  # `older` sorts first in arrival order
    data = (inbox / name).read_bytes()
    opts = {"predictor": "onnxruntime", "device": "cpu", "threads": 1}
    s = AdaptiveModel(artifacts, state, **opts)
    first = s.process(data, name=name, key=result_key(name, data))  # checkpointed
    s._unlock()  # the process dies here
    with AdaptiveModel(artifacts, state, **opts) as s2:
        counts = serve(inbox, outbox, s2, once=True, poll_s=0.02, settle_s=0.1,
                       stable_s=0.0, log=None)
        assert s2.n_images == 2
    assert counts["recovered"] == 1 and counts["served"] == 1
    recs = {json.loads(p.read_text())["image"]: json.loads(p.read_text())
            for p in outbox.glob("*.json")}
    assert recs[name]["recovered"] and recs[name]["images_adapted"] == 1
    assert recs[name]["theta_sha256"] == first["record"]["theta_sha256"]
    assert recs[older]["images_adapted"] == 2 and not recs[older]["recovered"]


def test_a_served_image_that_cannot_be_moved_is_retried_never_rejected(artifacts, tmp_path,
                                                                        monkeypatch):
    import errno

    import grata.runtime.inbox as inbox_mod
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    (name,) = make_inbox(inbox, 1, seed=15)
    real, failures = os.replace, []

    def flaky_replace(src, dst):
        if "processed" in str(dst) and len(failures) < 2:
            failures.append(dst)
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(src, dst)
    monkeypatch.setattr(inbox_mod.os, "replace", flaky_replace)
    monkeypatch.setattr(inbox_mod, "RETRY_S", 0.01)
    with AdaptiveModel(artifacts, None, predictor="onnxruntime", device="cpu",
                       threads=1) as model:
        counts = serve(inbox, outbox, model, once=True, poll_s=0.02, settle_s=0.1,
                       stable_s=0.0, log=None)
        assert model.n_images == 1  # adapted once; the retry found its result
    assert len(failures) == 2 and counts["rejected"] == 0
    assert counts["served"] == 1 and counts["already_served"] == 1
    assert (inbox / "processed" / name).exists() and not list((inbox / "rejected").iterdir())
    assert len(list(outbox.glob("*.json"))) == 1


class _Rewriting(_Faulty):
    """An AdaptiveModel during whose first process() of a named image a camera rewrites
    that inbox file with other content (a second exposure under the same name)."""

    def __init__(self, model, inbox, name, new_bytes):
        super().__init__(model, {})
        self.path, self.name, self.new, self.done = inbox / name, name, new_bytes, False

    def process(self, data, *, name=None, key=None):
        result = self.model.process(data, name=name, key=key)
        if name == self.name and not self.done:
            self.done = True
            self.path.write_bytes(self.new)
            st = self.path.stat()  # a different modification time, whatever the clock's grain
            os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        return result


def test_a_file_rewritten_while_served_is_not_moved_and_its_new_content_is_served(
        artifacts, tmp_path):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    names = make_inbox(inbox, 2, seed=9)
    other = (inbox / names[1]).read_bytes()
    with AdaptiveModel(artifacts, None, predictor="onnxruntime", device="cpu",
                       threads=1) as model:
        counts = serve(inbox, outbox, _Rewriting(model, inbox, names[0], other), once=True,
                       poll_s=0.02, settle_s=0.1, stable_s=0.0, log=None)
    digests = sorted(json.loads(p.read_text())["input_sha256"] for p in outbox.glob("*.json"))
    first = hashlib.sha256((inbox / "processed" / names[1]).read_bytes()).hexdigest()
    # the first content's result stands, the rewritten file was served again, never lost
    assert counts["served"] == 3 and first in digests and len(digests) == 3
    assert (inbox / "processed" / names[0]).read_bytes() == other

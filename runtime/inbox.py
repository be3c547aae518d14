"""The crash-safe inbox loop: watch a folder, serve each image once, never lose one.

``serve(inbox, outbox, model)`` watches a folder and writes a mask PNG, an overlay PNG
and a JSON record per image, adapting `model` (a `grata.runtime.adaptive.AdaptiveModel`)
on each in arrival order.

Crash consistency (kill -9 or a power cut at any instant)
---------------------------------------------------------
Every file is written to a temp file in its folder, fsynced, renamed, and the folder is
fsynced. Per image the order is:

  1. adapt (in memory);
  2. if a checkpoint is due (every ``checkpoint_every`` images): write the state (theta,
     Adam moments, step, generator state, counts, theta version, and the image's key =
     name + content hash as ``last_key``);
  3. write ``<key>.mask.png``, ``<key>.overlay.png``, then ``<key>.json``, the
     completion mark: a result is complete exactly when its JSON exists;
  4. move the image from the inbox to ``processed/``.

On start the state is loaded (refused unless it was made from the same source theta and
method; ``--reset`` starts from the source) and temp files of a killed run are removed.
For each inbox image, in arrival order:

  - its JSON exists -> it was served before the crash: moved to ``processed/``, not
    adapted again;
  - its key is the state's ``last_key`` -> the state already holds its update (crash
    between steps 2 and 3): predicted at the state's theta, which is the theta it was
    predicted with, and written (``recovered`` in its record); not adapted again;
  - otherwise it is new and goes through steps 1-4.

Invariant: every image has at most one result, and an image leaves the inbox only after
its result (or its rejection reason) is on disk. With ``checkpoint_every=1`` the state
includes the update of every image that has a result and of no other, so the theta that
resumes is the one after the last served image. With N > 1 the state is at most N - 1
images behind the results: images served after the last checkpoint keep their results
but their updates are lost and the run resumes from the checkpointed theta (the
checkpoint is also written on a clean exit, SIGTERM or Ctrl-C). Theta versions count
changes of theta since the state was made; after such a resume, the versions after the
checkpoint are issued again, and ``theta_sha256`` in the records tells thetas apart.

An image with the same name and content as one already served is treated as served.
Only one server may use a state folder at a time (an exclusive lock on ``state/lock``).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import threading
import time
from pathlib import Path

from ..atomic import fsync_dir, remove_temp_files, write_atomic
from ..errors import DataError, GrataError
from .adaptive import IMAGE_SUFFIXES, AdaptiveModel, json_bytes, now_utc

# names a camera or a copy tool uses while a file is still being written
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".download", "~")


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def log_stderr(msg: str) -> None:
    """One line on stderr, flushed (the default `log` of `serve`)."""
    print(msg, file=sys.stderr, flush=True)


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES)


class Watcher:
    """Inbox files ready to process, in arrival order (modification time, then name).

    A file is ready when its size and modification time are what the previous poll saw,
    or it was last modified `settle_s` ago or more (an empty file only then)."""

    def __init__(self, inbox: Path, settle_s: float):
        self.inbox, self.settle_s = inbox, settle_s
        self.seen: dict[str, tuple[int, int]] = {}

    def poll(self) -> tuple[list[Path], int]:
        now = time.time()
        ready, pending, seen = [], 0, {}
        with os.scandir(self.inbox) as it:
            for entry in it:
                if _ignored(entry.name) or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                sig = (st.st_size, st.st_mtime_ns)
                seen[entry.name] = sig
                old = now - st.st_mtime >= self.settle_s
                if old or (st.st_size > 0 and self.seen.get(entry.name) == sig):
                    ready.append((st.st_mtime_ns, entry.name))
                else:
                    pending += 1
        self.seen = seen
        return [self.inbox / n for _, n in sorted(ready)], pending


def result_key(name: str, data: bytes) -> str:
    """The stem of an image's result files: its name and 12 hex of its content's SHA-256."""
    return f"{name}.{hashlib.sha256(data).hexdigest()[:12]}"


def _free_name(folder: Path, name: str, digest: str) -> str:
    if not (folder / name).exists():
        return name
    stem, suffix = os.path.splitext(name)
    for i in range(1000):
        alt = f"{stem}.{digest[:12]}{'' if i == 0 else f'.{i}'}{suffix}"
        if not (folder / alt).exists():
            return alt
    raise GrataError(f"{folder}: too many files named like {name}")


def _move(src: Path, folder: Path, digest: str) -> Path:
    dest = folder / _free_name(folder, src.name, digest)
    os.replace(src, dest)
    fsync_dir(folder)
    fsync_dir(src.parent)
    return dest


def check_folders(inbox: Path, outbox: Path) -> None:
    if not inbox.is_dir():
        raise GrataError(f"inbox {inbox} is not a folder")
    if outbox.resolve() == inbox.resolve():
        raise GrataError("the outbox must not be the inbox (results would be served again)")


def serve(inbox, outbox, model: AdaptiveModel, *, once: bool = False,
          poll_s: float = 0.5, settle_s: float = 1.0, processed_dir=None, rejected_dir=None,
          stop: threading.Event | None = None, log=log_stderr, after_image=None) -> dict:
    """Watch `inbox`; adapt `model` on each new image, segment it and write it to
    `outbox`, in arrival order (see the module docstring for the files and the crash
    rules). Returns counts.

    `once`: process what is there (waiting for files still being written) and return.
    Otherwise run until `stop` is set. Images move to `processed_dir` (default
    INBOX/processed) after their result exists, or to `rejected_dir` (INBOX/rejected)
    with ``<name>.reason.txt``. `log` gets one line per image (None: silent);
    `after_image()` runs after each image's result or rejection is on disk (e.g. a report).
    """
    inbox, outbox = Path(inbox), Path(outbox)
    check_folders(inbox, outbox)
    processed = Path(processed_dir) if processed_dir else inbox / "processed"
    rejected = Path(rejected_dir) if rejected_dir else inbox / "rejected"
    for folder in (outbox, processed, rejected):
        folder.mkdir(parents=True, exist_ok=True)
    for folder in (outbox, rejected):
        remove_temp_files(folder)
    log = log or (lambda msg: None)
    stop = stop or threading.Event()
    counts = {"served": 0, "recovered": 0, "already_served": 0, "rejected": 0, "resets": 0}
    watcher = Watcher(inbox, settle_s)
    while not stop.is_set():
        ready, pending = watcher.poll()
        for path in ready:
            if stop.is_set():
                break
            _serve_one(path, outbox, processed, rejected, model, counts, log)
            if after_image is not None:
                after_image()
        if once and not ready and not pending:
            break
        if not ready:
            stop.wait(poll_s)
    model.checkpoint()
    return counts


def _serve_one(path: Path, outbox: Path, processed: Path, rejected: Path,
               model: AdaptiveModel, counts: dict, log) -> None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return  # taken away meanwhile
    except OSError as exc:
        data = None
        problem = f"cannot read: {exc.strerror or exc}"
    digest = hashlib.sha256(data).hexdigest() if data is not None else "0" * 64
    key = result_key(path.name, data) if data is not None else f"{path.name}.unreadable"
    if data is not None and (outbox / f"{key}.json").exists():
        _move(path, processed, digest)
        counts["already_served"] += 1
        log(f"{path.name}: already served ({key}.json); moved to {processed.name}/")
        return
    if data is not None and path.suffix.lower() not in IMAGE_SUFFIXES:
        data, problem = None, (f"not an image file (suffix {path.suffix or 'none'}; accepted: "
                               f"{', '.join(IMAGE_SUFFIXES)})")
    result = None
    if data is not None:
        try:
            if key == model.last_key:
                result = model.recover(data, name=path.name, key=key)
            else:
                result = model.process(data, name=path.name, key=key)
        except DataError as exc:
            problem = exc.problem
    if result is None:
        name = _free_name(rejected, path.name, digest)
        write_atomic(rejected / f"{name}.reason.txt", (
            f"image: {path.name}\nsha256: {digest}\nreason: {problem}\n"
            f"time: {now_utc()}\n").encode())
        try:
            os.replace(path, rejected / name)
        except FileNotFoundError:  # taken away meanwhile
            pass
        fsync_dir(rejected)
        fsync_dir(path.parent)
        counts["rejected"] += 1
        log(f"{path.name}: rejected: {problem}")
        return
    from ..report import overlay
    t0 = time.perf_counter()
    from PIL import Image
    files = {"mask": f"{key}.mask.png", "overlay": f"{key}.overlay.png"}
    write_atomic(outbox / files["mask"], _png_bytes(Image.fromarray(result["mask"])))
    write_atomic(outbox / files["overlay"], _png_bytes(overlay(result["image"],
                                                               result["pred"])))
    record = dict(result["record"])
    record["timings_ms"]["write"] = round((time.perf_counter() - t0) * 1e3, 3)
    record.update({"input_sha256": digest, "files": files, "written": now_utc()})
    write_atomic(outbox / f"{key}.json", json_bytes(record))  # the completion mark
    _move(path, processed, digest)
    counts["recovered" if record["recovered"] else "served"] += 1
    counts["resets"] += len(record["resets"])
    t = record["timings_ms"]
    vcdr = "-" if record["vcdr"] is None else f"{record['vcdr']:.2f}"
    log(f"{path.name}: disc {record['disc_area_px']} px, cup {record['cup_area_px']} px, "
        f"vCDR {vcdr}; adapt {t['adapt']:.0f} ms, predict {t['predict']:.0f} ms; "
        f"theta v{record['theta_version']} {record['theta_sha256']}"
        + (" (recovered: prediction only)" if record["recovered"] else "")
        + "".join(f"; RESET ({r['reason']}): {r['action']}" for r in record["resets"]))

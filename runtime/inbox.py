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

The image named by ``last_key`` (when it has no result yet) is served before any other,
even one that sorts earlier, so that it is predicted, not adapted a second time.

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
Only one server may use a state folder at a time (an exclusive lock on ``state/lock``)
and only one may watch an inbox (an exclusive lock on the inbox folder itself).

Hostile files and faults
------------------------
No single file stops the server. Result and rejection names are bounded and portable
whatever the input name (`safe_name`: unsafe characters become ``_``, long names are
cut, and a name changed so carries 8 hex of the original name's hash); the record keeps
the original name (``image``, undecodable bytes as ``\\xNN``, and ``image_hex`` then).
Names in reason files and log lines are quoted on one line.

A file that cannot be served (unreadable, not an image, truncated, or any unforeseen
error while serving it) is rejected only once it has been stable, size and modification
time unchanged, for ``stable_s`` (``--stable-for``, 10 s): before that it stays in the
inbox and is tried again, so a copy that stalls for a while is served once it completes.
A failure the system calls transient (no space, quota, out of file descriptors or
memory, EAGAIN, EBUSY, EINTR, a timeout) leaves the image in the inbox for a retry
with back-off (``--once``: three tries, then it is left for a later run). A file that
changed while it was read or served is never moved; it is read again.
If an unforeseen error happens after an image's update (e.g. while writing its
outputs), the state keeps that update and the image is rejected with the error's type
and message; a transient one is retried and, its key being the state's ``last_key``,
predicted without adapting again.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from grata.atomic import fsync_dir, remove_temp_files, write_atomic
from grata.decode import max_pixels, quote
from grata.errors import DataError, GrataError
from grata.decode import IMAGE_SUFFIXES
from grata.runtime.adaptive import AdaptiveModel
from grata.runtime.record import json_bytes, now_utc
from grata.runtime.state_lock import exclusive_lock
from grata.report import overlay, photo_overlay
from PIL import Image

# names a camera or a copy tool uses while a file is still being written
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".download", "~")
DEFAULT_STABLE_S = 10.0
MAX_NAME = 96  # characters of a result's or rejected file's name before its hashes
# errors of the system, not of the file: the image is tried again later
TRANSIENT_ERRNOS = frozenset(getattr(errno, n) for n in (
    "EAGAIN", "EWOULDBLOCK", "EINTR", "ENOSPC", "EDQUOT", "EBUSY", "ENOMEM", "EMFILE",
    "ENFILE", "ETIMEDOUT", "ESTALE") if hasattr(errno, n))
RETRY_S = 2.0  # first wait after a transient failure (doubling, at most a minute)
ONCE_TRIES = 3
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def log_stderr(msg: str) -> None:
    """One line on stderr, flushed (the default `log` of `serve`)."""
    print(msg, file=sys.stderr, flush=True)


def one_line(text) -> str:
    """`text` as one printable line: control characters, newlines and undecodable bytes
    escaped (a file name cannot inject a line into a reason file or the log)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def display_name(name: str) -> str:
    """A file name as text for the record: UTF-8 as is, other bytes as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def safe_name(name: str) -> str:
    """A bounded, portable file name for `name`: itself when it is short and only holds
    letters, digits and ``._+-`` (not leading ``.``); otherwise the other characters as
    ``_``, cut to MAX_NAME characters, with ``~`` and 8 hex of the original name's
    SHA-256 before the suffix (so sanitising never makes two names one)."""
    if len(name) <= MAX_NAME and not _UNSAFE.search(name) and not name.startswith("."):
        return name
    raw = os.fsencode(name)
    text = _UNSAFE.sub("_", raw.decode("utf-8", "replace"))
    stem, suffix = os.path.splitext(text)
    if len(suffix) > 8:
        stem, suffix = text, ""
    tag = hashlib.sha256(raw).hexdigest()[:8]
    stem = stem[: MAX_NAME - len(suffix) - len(tag) - 1].lstrip(".") or "_"
    return f"{stem}~{tag}{suffix}"


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES)


class Watcher:
    """Inbox files ready to process, in arrival order (modification time, then name).

    A file is ready when its size and modification time are what the previous poll saw,
    or it was last modified `settle_s` ago or more (an empty file only then). `seen`
    maps each file's name to its (size, mtime_ns) at the last poll."""

    def __init__(self, inbox: Path, settle_s: float):
        self.inbox, self.settle_s = inbox, settle_s
        self.seen: dict[str, tuple[int, int]] = {}

    def poll(self) -> tuple[list[Path], int]:
        now = time.time()
        ready, pending, seen = [], 0, {}
        with os.scandir(self.inbox) as it:
            for entry in it:
                try:
                    if _ignored(entry.name) or not entry.is_file(follow_symlinks=False):
                        continue
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
    """The stem of an image's result files: its safe name (`safe_name`) and 12 hex of
    its content's SHA-256."""
    return f"{safe_name(name)}.{hashlib.sha256(data).hexdigest()[:12]}"


def _free_name(folder: Path, name: str, digest: str) -> str:
    if not (folder / name).exists():
        return name
    stem, suffix = os.path.splitext(safe_name(name))
    for i in range(100):
        alt = f"{stem}.{digest[:12]}{'' if i == 0 else f'.{i}'}{suffix}"
        if not (folder / alt).exists():
            return alt
    return f"{stem}.{digest[:12]}.{os.urandom(6).hex()}{suffix}"


def _stat_sig(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _is_transient(exc: BaseException) -> bool:
    return (isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS) or \
        isinstance(exc, MemoryError)


def describe_error(exc: BaseException) -> str:
    """An error in one line: its type and message, never an object's repr."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = " ".join(str(exc).split())
    return one_line(_OBJECT_REPR.sub("an object", f"{type(exc).__name__}: {text}")[:300])


def _probe_writable(folder: Path, what: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".grata-probe-", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise GrataError(f"{what} {quote(folder)} is not writable: "
                         f"{exc.strerror or describe_error(exc)}") from None


def check_folders(inbox, outbox) -> None:
    """Refuse, in one line, an inbox that is not a writable folder, an outbox that
    cannot be made or written, or an outbox that is the inbox."""
    inbox, outbox = Path(inbox), Path(outbox)
    if not inbox.is_dir():
        raise GrataError(f"inbox {quote(inbox)} is not a folder")
    if outbox.resolve() == inbox.resolve():
        raise GrataError("the outbox must not be the inbox (results would be served again)")
    try:
        outbox.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GrataError(f"outbox {quote(outbox)} cannot be made: "
                         f"{exc.strerror or describe_error(exc)}") from None
    _probe_writable(outbox, "outbox")
    _probe_writable(inbox, "inbox")  # images are moved out of it


def lock_inbox(inbox) -> int:
    """Hold an exclusive lock on the inbox folder (one server per inbox); returns the
    descriptor (closing it releases the lock). A second server gets a GrataError."""
    inbox = Path(inbox)
    return exclusive_lock(inbox, f"inbox {quote(inbox)} is watched by another grata serve",
                          folder=True)


class _Leave(Exception):
    """The file stays in the inbox for now (still changing, not stable yet, or a
    transient failure); `until`: the earliest time to try it again if unchanged."""

    def __init__(self, why: str, until: float, transient: bool = False):
        super().__init__(why)
        self.why, self.until, self.transient = why, until, transient


def serve(inbox, outbox, model: AdaptiveModel, *, once: bool = False,
          poll_s: float = 0.5, settle_s: float = 1.0, stable_s: float = DEFAULT_STABLE_S,
          processed_dir=None, rejected_dir=None, stop: threading.Event | None = None,
          log=log_stderr, after_image=None, locked: bool = False) -> dict:
    """Watch `inbox`; adapt `model` on each new image, segment it and write it to
    `outbox`, in arrival order (see the module docstring for the files, the crash
    rules and hostile files). Returns counts.

    `once`: process what is there (waiting for files still being written) and return.
    Otherwise run until `stop` is set. Images move to `processed_dir` (default
    INBOX/processed) after their result exists, or to `rejected_dir` (INBOX/rejected)
    with ``<name>.reason.txt`` once stable for `stable_s` seconds. `log` gets one line
    per image (None: silent); `after_image()` runs after each image's result or
    rejection is on disk (e.g. a report). The inbox is locked for the call unless
    `locked` (the caller holds `lock_inbox`).
    """
    inbox, outbox = Path(inbox), Path(outbox)
    check_folders(inbox, outbox)
    max_pixels()  # a wrong GRATA_MAX_PIXELS stops here, not on every image
    lock_fd = None if locked else lock_inbox(inbox)
    try:
        return _loop(inbox, outbox, model, once=once, poll_s=poll_s, settle_s=settle_s,
                     stable_s=stable_s, processed_dir=processed_dir,
                     rejected_dir=rejected_dir, stop=stop or threading.Event(),
                     log=log or (lambda msg: None), after_image=after_image)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def _loop(inbox, outbox, model, *, once, poll_s, settle_s, stable_s, processed_dir,
          rejected_dir, stop, log, after_image) -> dict:
    processed = Path(processed_dir) if processed_dir else inbox / "processed"
    rejected = Path(rejected_dir) if rejected_dir else inbox / "rejected"
    for folder in (processed, rejected):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GrataError(f"{quote(folder)} cannot be made: "
                             f"{exc.strerror or describe_error(exc)}") from None
    for folder in (outbox, rejected):
        remove_temp_files(folder)
    counts = {"served": 0, "recovered": 0, "already_served": 0, "rejected": 0, "resets": 0,
              "retried": 0, "left": 0}
    watcher = Watcher(inbox, settle_s)
    # the image whose update the state holds without a result goes first, else it would
    # be adapted again after an image that sorts before it (e.g. an older copy)
    held = _held_image(inbox, outbox, model)
    hold_until = time.monotonic() + max(30.0, 5 * settle_s)
    waiting: dict[str, tuple] = {}  # name -> (size/mtime when left, retry time)
    tries: dict[str, int] = {}  # transient failures per name
    left: set[str] = set()  # --once: given up after ONCE_TRIES transient failures
    while not stop.is_set():
        ready, pending = watcher.poll()
        now = time.time()
        for name in [n for n in waiting if n not in watcher.seen]:
            del waiting[name]  # taken away
        if held is not None and (not os.path.lexists(held[0]) or time.monotonic() > hold_until
                                 or model.last_key != held[1]
                                 or (outbox / f"{held[1]}.json").exists()):
            held = None
        if held is not None:  # nothing else until it is served
            pending += sum(p != held[0] for p in ready)
            ready = [p for p in ready if p == held[0]]
        todo = []
        for path in ready:
            if path.name in left:
                continue
            sig, until = waiting.get(path.name, (None, 0.0))
            if sig == watcher.seen.get(path.name) and now < until:
                pending += 1  # unchanged and not due yet
                continue
            todo.append(path)
        done = 0
        for path in todo:
            if stop.is_set():
                break
            name = path.name
            try:
                wrote = _serve_one(path, outbox, processed, rejected, model, counts, log,
                                   stable_s)
            except _Leave as leave:
                pending += 1
                if leave.transient:
                    tries[name] = tries.get(name, 0) + 1
                    counts["retried"] += 1
                    if once and tries[name] >= ONCE_TRIES:
                        left.add(name)
                        counts["left"] += 1
                        pending -= 1
                        log(f"{quote(name)}: left in the inbox for a later run: {leave.why}")
                        continue
                    log(f"{quote(name)}: will be tried again: {leave.why}")
                waiting[name] = (_stat_sig(path), leave.until)
                continue
            waiting.pop(name, None)
            tries.pop(name, None)
            if wrote:
                done += 1
                if after_image is not None:
                    after_image()
        if once and not todo and not pending:
            break
        if not done:
            stop.wait(poll_s)
    model.checkpoint()
    return counts


def _held_image(inbox: Path, outbox: Path, model) -> tuple[Path, str] | None:
    """(path, key) of the inbox image named by the state's ``last_key`` when it has no
    result yet (the crash fell between the checkpoint and its outputs), else None."""
    key = getattr(model, "last_key", None)
    if not key or (outbox / f"{key}.json").exists():
        return None
    stem = key.rsplit(".", 1)[0]
    try:
        with os.scandir(inbox) as it:
            names = [e.name for e in it if safe_name(e.name) == stem
                     and e.is_file(follow_symlinks=False)]
        for name in names:
            if result_key(name, (inbox / name).read_bytes()) == key:
                return inbox / name, key
    except OSError:
        pass
    return None


def _serve_one(path: Path, outbox: Path, processed: Path, rejected: Path,
               model: AdaptiveModel, counts: dict, log, stable_s: float) -> bool:
    """Serve or reject one inbox file; True when a result or rejection was written.
    Raises _Leave when the file stays in the inbox for now; nothing else escapes."""
    name = path.name
    sig = _stat_sig(path)
    if sig is None:
        return False  # taken away meanwhile
    data = None
    try:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _is_transient(exc):
                raise
            problem = f"cannot read: {exc.strerror or describe_error(exc)}"
        if _stat_sig(path) != sig:  # still being written
            raise _Leave("changed while read", 0.0)
        if data is not None:
            digest = hashlib.sha256(data).hexdigest()
            key = result_key(name, data)
            if (outbox / f"{key}.json").exists():
                _move(path, processed, digest, sig)
                counts["already_served"] += 1
                log(f"{quote(name)}: already served ({key}.json); moved to {processed.name}/")
                return True
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                problem = (f"not an image file (suffix {one_line(path.suffix) or 'none'}; "
                           f"accepted: {', '.join(IMAGE_SUFFIXES)})")
            else:
                try:
                    _serve_image(path, name, data, digest, key, sig, outbox, processed,
                                 model, counts, log)
                    return True
                except DataError as exc:
                    problem = exc.problem
    except _Leave:
        raise
    except Exception as exc:  # noqa: BLE001  (no single file may stop the server)
        if _is_transient(exc):
            raise _Leave(describe_error(exc), time.time() + RETRY_S, transient=True) \
                from None
        problem = f"unexpected error while serving it: {describe_error(exc)}"
    _reject(path, name, sig, data, problem, rejected, counts, log, stable_s)
    return True


def _reject(path, name, sig, data, problem, rejected, counts, log, stable_s) -> None:
    """Move the file to `rejected` with its reason, once stable for `stable_s`."""
    stable_at = sig[1] / 1e9 + stable_s
    if time.time() < stable_at:  # it may still be completed: try again then
        raise _Leave(f"not stable yet ({one_line(problem)})", stable_at)
    digest = hashlib.sha256(data).hexdigest() if data is not None else "unreadable"
    try:
        dest = _free_name(rejected, safe_name(name), digest)
        reason = rejected / f"{dest}.reason.txt"
        write_atomic(reason, (f"image: {quote(name)}\nsha256: {digest}\n"
                              f"reason: {one_line(problem)}\ntime: {now_utc()}\n"
                              ).encode())
        if _stat_sig(path) != sig:  # changed meanwhile: read it again
            reason.unlink(missing_ok=True)
            raise _Leave("changed while being rejected", 0.0)
        try:
            os.replace(path, rejected / dest)
        except FileNotFoundError:  # taken away meanwhile
            pass
        fsync_dir(rejected)
        fsync_dir(path.parent)
    except _Leave:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _Leave(f"cannot be rejected: {describe_error(exc)}", time.time() + RETRY_S,
                     transient=True) from None
    counts["rejected"] += 1
    log(f"{quote(name)}: rejected: {one_line(problem)}")


def _move(src: Path, folder: Path, digest: str, sig) -> None:
    """Move a served image out of the inbox, unless it changed since it was read."""
    if _stat_sig(src) != sig:
        raise _Leave("changed after it was read", 0.0)
    try:
        dest = folder / _free_name(folder, src.name, digest)
        os.replace(src, dest)
    except OSError as exc:  # its result exists: never rejected, moved at the next try
        raise _Leave(f"served, but not moved to {folder.name}/: {describe_error(exc)}",
                     time.time() + RETRY_S, transient=True) from None
    fsync_dir(folder)
    fsync_dir(src.parent)


def _serve_image(path, name, data, digest, key, sig, outbox, processed, model, counts,
                 log) -> None:
    shown = display_name(name)
    if key == model.last_key:
        result = model.recover(data, name=shown, key=key)
    else:
        result = model.process(data, name=shown, key=key)
    t0 = time.perf_counter()
    files = {"mask": f"{key}.mask.png", "overlay": f"{key}.overlay.png"}
    write_atomic(outbox / files["mask"], _png_bytes(Image.fromarray(result["mask"])))
    photo = result.get("photo")
    picture = (overlay(result["image"], result["pred"]) if photo is None else
               photo_overlay(photo.pixels, result["pred_full"], None, photo.box))
    write_atomic(outbox / files["overlay"], _png_bytes(picture))
    record = dict(result["record"])
    record["image"] = shown
    if shown != name:  # not UTF-8: the exact bytes too
        record["image_hex"] = os.fsencode(name).hex()
    record["timings_ms"]["write"] = round((time.perf_counter() - t0) * 1e3, 3)
    record.update({"input_sha256": digest, "files": files, "written": now_utc()})
    write_atomic(outbox / f"{key}.json", json_bytes(record))  # the completion mark
    counts["recovered" if record["recovered"] else "served"] += 1
    counts["resets"] += len(record["resets"])
    t = record["timings_ms"]
    vcdr = "-" if record["vcdr"] is None else f"{record['vcdr']:.2f}"
    log(f"{quote(name)}: disc {record['disc_area_px']} px, cup {record['cup_area_px']} px, "
        f"vCDR {vcdr}; adapt {t['adapt']:.0f} ms, predict {t['predict']:.0f} ms; "
        f"theta v{record['theta_version']} {record['theta_sha256']}"
        + (" (recovered: prediction only)" if record["recovered"] else "")
        + "".join(f"; RESET ({r['reason']}): {r['action']}" for r in record["resets"]))
    try:
        _move(path, processed, digest, sig)
    except _Leave as leave:
        if leave.transient:
            raise
        # served, but the file changed after it was read: it is read again
        log(f"{quote(name)}: changed after it was served; left in the inbox")

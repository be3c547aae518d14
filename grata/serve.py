"""Point-of-care serving: adapt on each image as it arrives, segment it, never lose state.

Python API
----------
``Session(artifacts, state_dir, method="grata", backend="auto", ...)`` holds the adapted
state; ``Session.process(image)`` adapts on one image (one step of the method over the
artifacts' gradient graphs, `OrtEngine`), predicts it with the serving backend
(`grata.runtime.serving`: onnxruntime or TensorRT) at the adapted theta and returns
``{"record": {...}, "mask": uint8 [H, W], "pred": bool [2, S, S], "logits": ...}``.
``serve(inbox, outbox, session)`` watches a folder and writes a mask PNG, an overlay PNG
and a JSON record per image. ``grata serve`` is the command line over both.

Safety of the adapted model
---------------------------
Per image: the method's own guard (a non-finite loss, gradient, theta or moment restores
the last good theta and moments), a drift bound (``max_drift``: the relative L2 distance
``|theta - theta0| / |theta0|``; above it theta, the moments and the step count return to
their values before this image, or to the source when those are also too far) and a
finite-prediction check (non-finite logits restore the last good state and predict
again; if they are still non-finite the image is rejected). Every reset is listed in
that image's record (``resets``) and the drift is reported in every record.

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

import argparse
import hashlib
import io
import json
import math
import os
import signal
import sys
import threading
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .atomic import fsync_dir, write_atomic
from .errors import DataError, GrataError

STATE_FILE = "state.npz"
LOCK_FILE = "lock"
STATE_FORMAT = 1
RECORD_FORMAT = 1
DEFAULT_MAX_DRIFT = 0.5
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# names a camera or a copy tool uses while a file is still being written
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".download", "~")


# ------------------------------------------------------------------------ file helpers

def _remove_temp_files(folder: Path) -> int:
    """Delete the temp files `write_atomic` leaves when killed mid-write."""
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                p.unlink(missing_ok=True)
                n += 1
    return n


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode("utf-8")


def theta_digest(theta) -> str:
    """Short SHA-256 of theta's float32 bytes: tells thetas apart in records and logs."""
    a = np.ascontiguousarray(np.asarray(theta), dtype=np.float32)
    return hashlib.sha256(a.tobytes()).hexdigest()[:16]


def relative_drift(theta, theta0) -> float:
    """|theta - theta0| / |theta0| (L2 over the whole vector)."""
    t = np.asarray(theta, dtype=np.float64)
    t0 = np.asarray(theta0, dtype=np.float64)
    return float(np.linalg.norm(t - t0) / max(np.linalg.norm(t0), 1e-12))


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ----------------------------------------------------------------------------- session

def _adapt_engine(artifacts, device: str, threads: int | None, verify: bool):
    """An `OrtEngine` whose `infer` does nothing: `Method.adapt` then only adapts, and the
    serving backend makes the prediction (timed on its own)."""
    from .runtime import OrtEngine

    class AdaptOnlyEngine(OrtEngine):
        def infer(self, x, norm: str = "sample"):
            return None

    return AdaptOnlyEngine(artifacts, device=device, threads=threads, verify=verify)


class Session:
    """The adapted model of one point of care: adapt and predict image by image.

    `state_dir` (optional) holds ``state.npz``, checkpointed atomically every
    `checkpoint_every` images and by `checkpoint()` / `close()`; a session started on it
    resumes from it (see the module docstring). `reset=True` starts from the source
    theta and overwrites the state at once. `backend`: ``auto``, ``onnxruntime`` or
    ``tensorrt``; `device`: onnxruntime's provider for the adaptation (and for the
    onnxruntime backend): ``auto``, ``cpu``, ``cuda``, ``tensorrt``. `precision` and
    `calibration` (images or a folder of them, for int8) go to TensorRT. `max_drift=None`
    disables the drift bound. Extra keyword arguments are the method's hyperparameters.
    """

    def __init__(self, artifacts, state_dir=None, method: str = "grata",
                 backend: str = "auto", *, device: str = "auto", precision: str | None = None,
                 threads: int | None = None, checkpoint_every: int = 1,
                 max_drift: float | None = DEFAULT_MAX_DRIFT, seed: int = 0,
                 reset: bool = False, calibration=None, cache_dir=None, verify: bool = True,
                 **hyperparameters):
        from .methods import METHODS, create
        from .runtime.serving import GRAPHS, make_predictor, resolve_ort_device

        if method not in METHODS:
            raise GrataError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if int(checkpoint_every) < 1:
            raise GrataError(f"checkpoint_every must be at least 1, not {checkpoint_every}")
        if max_drift is not None and not max_drift > 0:
            raise GrataError(f"max_drift must be positive, not {max_drift}")
        self.checkpoint_every = int(checkpoint_every)
        self.max_drift = None if max_drift is None else float(max_drift)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._lock_fd = None
        if self.state_dir is not None:
            self._lock()
        try:
            ort_device = resolve_ort_device(device)
            self.engine = _adapt_engine(artifacts, ort_device, threads, verify)
            self.size = self.engine.size
            self.method = create(method, self.engine, seed=seed, **hyperparameters)
            graph = GRAPHS[self.method.norm]
            if isinstance(calibration, (str, Path)):
                calibration = self._calibration_images(Path(calibration))
            self.predictor = make_predictor(
                backend, artifacts, graph=graph, device=ort_device, threads=threads,
                precision=precision, session=self.engine.sessions.get(graph),
                cache_dir=cache_dir, calibration=calibration, verify=False)
            self.source_sha256 = hashlib.sha256(
                np.ascontiguousarray(self.engine.theta0, np.float32).tobytes()).hexdigest()
            self.n_images = 0
            self.theta_version = 0
            self.last_key: str | None = None
            self.resumed: dict | None = None
            self._dirty = False
            if self.state_dir is not None:
                if not reset and (self.state_dir / STATE_FILE).exists():
                    self._load_state()
                else:
                    self.checkpoint()  # a fresh state now: a crash never resumes an old one
        except BaseException:
            self._unlock()
            raise

    # -- properties ----------------------------------------------------------------
    @property
    def theta(self) -> np.ndarray:
        return np.array(self.engine.to_numpy(self.engine.theta), dtype=np.float32)

    @property
    def drift(self) -> float:
        return relative_drift(self.engine.theta, self.engine.theta0)

    def describe(self) -> str:
        p = self.predictor
        adapt = self.engine.sessions["entropy_grad"].get_providers()[0]
        return (f"method {self.method.name} (adapting on onnxruntime {adapt}); serving on "
                f"{getattr(p, 'detail', p.name)} ({p.precision})")

    # -- one image -----------------------------------------------------------------
    def process(self, image, *, name: str | None = None, key: str | None = None) -> dict:
        """Adapt on `image` (a file path, the file's bytes, or a model input [3, S, S]
        in [0, 1]), then predict it at the adapted theta. Raises `DataError` for an
        unusable image (the state is then as before)."""
        t0 = time.perf_counter()
        img, name, size_wh = self._load(image, name)
        x = self.engine.to_input(img)
        t_load = time.perf_counter() - t0
        e, m = self.engine, self.method
        snap = (e.copy(e.theta), e.copy(m.m), e.copy(m.v), m.t)
        n_events = len(m.events)
        t1 = time.perf_counter()
        m.adapt(x, image=img)
        t_adapt = time.perf_counter() - t1
        resets = [{"reason": ev.get("event", "non-finite"), "action": ev.get("action")}
                  for ev in m.events[n_events:]]
        drift = self.drift
        if self.max_drift is not None and not drift <= self.max_drift:
            resets.append(self._restore(snap, "drift", drift=drift,
                                        max_drift=self.max_drift))
        if not np.array_equal(e.to_numpy(e.theta), snap[0]):
            self.theta_version += 1
        t2 = time.perf_counter()
        logits = np.asarray(self.predictor.predict(x, e.theta))
        if not np.isfinite(logits).all():
            if np.array_equal(e.to_numpy(e.theta), snap[0]):
                raise DataError(name, "the prediction is not finite (at the last good theta)")
            resets.append(self._restore(snap, "non-finite prediction"))
            self.theta_version += 1
            logits = np.asarray(self.predictor.predict(x, e.theta))
            if not np.isfinite(logits).all():
                raise DataError(name, "the prediction is not finite even at the last good "
                                      "theta")
        t_predict = time.perf_counter() - t2
        self.n_images += 1
        self.last_key = key or name
        self._dirty = True
        out = self._result(img, logits, name, key, size_wh, resets,
                           {"load": t_load, "adapt": t_adapt, "predict": t_predict},
                           recovered=False)
        if self.state_dir is not None and self.n_images % self.checkpoint_every == 0:
            self.checkpoint()
        return out

    def recover(self, image, *, name: str | None = None, key: str | None = None) -> dict:
        """The result of an image whose update the state already holds: a prediction at
        the current theta, without adapting (the state does not change)."""
        t0 = time.perf_counter()
        img, name, size_wh = self._load(image, name)
        x = self.engine.to_input(img)
        t_load = time.perf_counter() - t0
        t2 = time.perf_counter()
        logits = np.asarray(self.predictor.predict(x, self.engine.theta))
        if not np.isfinite(logits).all():
            raise DataError(name, "the prediction is not finite")
        t_predict = time.perf_counter() - t2
        return self._result(img, logits, name, key, size_wh, [],
                            {"load": t_load, "adapt": 0.0, "predict": t_predict},
                            recovered=True)

    def reset(self) -> None:
        """Back to the source theta: fresh moments, step count and augmentation stream
        (checkpointed at once when there is a state folder)."""
        self.method.reset()
        self.theta_version += 1
        self.n_images = 0
        self.last_key = None
        self._dirty = True
        if self.state_dir is not None:
            self.checkpoint()

    def _restore(self, snap, reason: str, **info) -> dict:
        e, m = self.engine, self.method
        theta, mm, vv, t = snap
        action = "restored the last good theta, moments and step"
        if self.max_drift is not None and relative_drift(theta, e.theta0) > self.max_drift:
            theta, mm, vv, t = e.theta0, e.zeros(), e.zeros(), 0
            action = "reset to the source theta (the last good one is beyond max_drift)"
        e.assign(e.theta, theta)
        e.assign(m.m, mm)
        e.assign(m.v, vv)
        m.t = t
        m.good = None  # taken again from the restored state at the next step
        return {"reason": reason, **{k: _finite_or_none(v) for k, v in info.items()},
                "action": action}

    def _load(self, image, name: str | None):
        from PIL import Image

        from .data import load_image
        S = self.size
        if isinstance(image, np.ndarray):
            img = np.ascontiguousarray(image, dtype=np.float32)
            if img.shape != (3, S, S):
                raise DataError(name or "array", f"expected a [3, {S}, {S}] image, got "
                                                  f"{list(img.shape)}")
            if not np.isfinite(img).all():
                raise DataError(name or "array", "image has non-finite values")
            return img, name or "array", (S, S)
        if isinstance(image, (bytes, bytearray)):
            data, name = bytes(image), name or "image"
        else:
            path = Path(image)
            name = name or path.name
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DataError(path, f"cannot read: {exc.strerror or exc}") from None
        try:
            img = load_image(io.BytesIO(data), S)
        except DataError as exc:
            raise DataError(name, exc.problem) from None
        with Image.open(io.BytesIO(data)) as im:
            size_wh = im.size
        return img, name, size_wh

    def _result(self, img, logits, name, key, size_wh, resets, timings, recovered) -> dict:
        from PIL import Image

        from .data import to_mask_png
        from .metrics import binarize, probs_from_logits, vertical_cdr
        pred = binarize(probs_from_logits(np.asarray(logits, np.float32)[0]))
        mask = to_mask_png(pred)
        if tuple(size_wh) != (self.size, self.size):  # back to the picture's own size
            mask = np.asarray(Image.fromarray(mask).resize(tuple(size_wh), Image.NEAREST))
        disc, cup = mask < 255, mask == 0
        m = self.method
        record = {
            "format_version": RECORD_FORMAT, "image": name, "key": key,
            "method": m.name, "backend": self.predictor.name,
            "precision": self.predictor.precision, "model_size": self.size,
            "image_size": [int(size_wh[0]), int(size_wh[1])],
            "disc_area_px": int(disc.sum()), "cup_area_px": int(cup.sum()),
            "disc_area_fraction": float(disc.mean()), "cup_area_fraction": float(cup.mean()),
            "vcdr": _finite_or_none(vertical_cdr(np.stack([disc, cup]))),
            "timings_ms": {k: round(v * 1e3, 3) for k, v in timings.items()},
            "theta_version": self.theta_version,
            "theta_sha256": theta_digest(self.engine.to_numpy(self.engine.theta)),
            "theta_drift": _finite_or_none(self.drift), "max_drift": self.max_drift,
            "step": int(m.t), "images_adapted": self.n_images,
            "losses": {k: _finite_or_none(v) for k, v in m.last.items()} if not recovered
            else {},
            "resets": resets, "recovered": recovered,
        }
        return {"record": record, "mask": mask, "pred": pred, "logits": logits, "image": img}

    def _calibration_images(self, folder: Path) -> list[np.ndarray]:
        from .data import load_image
        if not folder.is_dir():
            raise GrataError(f"--calibration {folder}: not a folder")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise GrataError(f"--calibration {folder}: no images")
        return [load_image(p, self.size) for p in files]

    # -- state ---------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Write the adapted state atomically (no-op without a state folder)."""
        if self.state_dir is None:
            return
        e, m = self.engine, self.method
        arrays = {
            "format_version": np.int64(STATE_FORMAT),
            "theta": np.asarray(e.to_numpy(e.theta), np.float32),
            "m": np.asarray(e.to_numpy(m.m), np.float32),
            "v": np.asarray(e.to_numpy(m.v), np.float32),
            "t": np.int64(m.t), "n_images": np.int64(self.n_images),
            "theta_version": np.int64(self.theta_version),
            "rng": np.array(json.dumps(m.rng.bit_generator.state)),
            "source_sha256": np.array(self.source_sha256), "method": np.array(m.name),
            "seed": np.int64(m.seed), "last_key": np.array(self.last_key or ""),
            "written": np.array(_now()),
        }
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_atomic(self.state_dir / STATE_FILE, buf.getvalue())
        self._dirty = False

    def _load_state(self) -> None:
        path = self.state_dir / STATE_FILE
        hint = "pass --reset to start from the source theta"
        try:
            with np.load(path, allow_pickle=False) as z:
                st = {k: z[k] for k in z.files}
            version = int(st["format_version"])
            method, source = str(st["method"]), str(st["source_sha256"])
            theta, mm, vv = st["theta"], st["m"], st["v"]
            rng_state = json.loads(str(st["rng"]))
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise GrataError(f"state {path} cannot be read ({type(exc).__name__}); "
                             f"{hint}") from None
        e, m = self.engine, self.method
        if version != STATE_FORMAT:
            raise GrataError(f"state {path} has format {version}, not {STATE_FORMAT}; {hint}")
        if source != self.source_sha256:
            raise GrataError(f"state {path} was adapted from another source model (its "
                             f"source theta differs from these artifacts'); {hint}")
        if method != m.name:
            raise GrataError(f"state {path} belongs to method {method!r}, not "
                             f"{m.name!r}; {hint}")
        if not (theta.shape == mm.shape == vv.shape == e.theta0.shape):
            raise GrataError(f"state {path}: theta has shape {theta.shape}, the artifacts "
                             f"{e.theta0.shape}; {hint}")
        e.assign(e.theta, theta)
        e.assign(m.m, mm)
        e.assign(m.v, vv)
        m.t = int(st["t"])
        m.rng.bit_generator.state = rng_state
        m.good = None
        self.n_images = m.n_seen = int(st["n_images"])
        self.theta_version = int(st["theta_version"])
        self.last_key = str(st["last_key"]) or None
        self.resumed = {"n_images": self.n_images, "theta_version": self.theta_version,
                        "step": m.t, "theta_sha256": theta_digest(theta),
                        "written": str(st.get("written", ""))}

    def _lock(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            self._lock_fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise GrataError(f"state {self.state_dir} is in use by another grata serve") \
                from None
        self._lock_fd = fd
        _remove_temp_files(self.state_dir)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the lock
            self._lock_fd = None

    def close(self) -> None:
        """Checkpoint if anything changed since the last checkpoint; release the state."""
        try:
            if self._dirty and self._lock_fd is not None:
                self.checkpoint()
        finally:
            self._unlock()

    def __enter__(self) -> Session:  # noqa: PYI034  (Python 3.10 has no typing.Self)
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------- folder server

def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES)


class _Watcher:
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


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_folders(inbox: Path, outbox: Path) -> None:
    if not inbox.is_dir():
        raise GrataError(f"inbox {inbox} is not a folder")
    if outbox.resolve() == inbox.resolve():
        raise GrataError("the outbox must not be the inbox (results would be served again)")


def serve(inbox, outbox, session: Session, *, once: bool = False, poll_s: float = 0.5,
          settle_s: float = 1.0, processed_dir=None, rejected_dir=None,
          stop: threading.Event | None = None, log=_stderr) -> dict:
    """Watch `inbox`; adapt, segment and write each new image to `outbox` in arrival
    order (see the module docstring for the files and the crash rules). Returns counts.

    `once`: process what is there (waiting for files still being written) and return.
    Otherwise run until `stop` is set. Images move to `processed_dir` (default
    INBOX/processed) after their result exists, or to `rejected_dir` (INBOX/rejected)
    with ``<name>.reason.txt``. `log` gets one line per image (None: silent).
    """
    inbox, outbox = Path(inbox), Path(outbox)
    _check_folders(inbox, outbox)
    processed = Path(processed_dir) if processed_dir else inbox / "processed"
    rejected = Path(rejected_dir) if rejected_dir else inbox / "rejected"
    for folder in (outbox, processed, rejected):
        folder.mkdir(parents=True, exist_ok=True)
    for folder in (outbox, rejected):
        _remove_temp_files(folder)
    log = log or (lambda msg: None)
    stop = stop or threading.Event()
    counts = {"served": 0, "recovered": 0, "already_served": 0, "rejected": 0, "resets": 0}
    watcher = _Watcher(inbox, settle_s)
    while not stop.is_set():
        ready, pending = watcher.poll()
        for path in ready:
            if stop.is_set():
                break
            _serve_one(path, outbox, processed, rejected, session, counts, log)
        if once and not ready and not pending:
            break
        if not ready:
            stop.wait(poll_s)
    session.checkpoint()
    return counts


def _serve_one(path: Path, outbox: Path, processed: Path, rejected: Path, session: Session,
               counts: dict, log) -> None:
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
            if key == session.last_key:
                result = session.recover(data, name=path.name, key=key)
            else:
                result = session.process(data, name=path.name, key=key)
        except DataError as exc:
            problem = exc.problem
    if result is None:
        name = _free_name(rejected, path.name, digest)
        write_atomic(rejected / f"{name}.reason.txt", (
            f"image: {path.name}\nsha256: {digest}\nreason: {problem}\n"
            f"time: {_now()}\n").encode())
        try:
            os.replace(path, rejected / name)
        except FileNotFoundError:  # taken away meanwhile
            pass
        fsync_dir(rejected)
        fsync_dir(path.parent)
        counts["rejected"] += 1
        log(f"{path.name}: rejected: {problem}")
        return
    from .report import overlay
    t0 = time.perf_counter()
    from PIL import Image
    files = {"mask": f"{key}.mask.png", "overlay": f"{key}.overlay.png"}
    write_atomic(outbox / files["mask"], _png_bytes(Image.fromarray(result["mask"])))
    write_atomic(outbox / files["overlay"], _png_bytes(overlay(result["image"],
                                                               result["pred"])))
    record = dict(result["record"])
    record["timings_ms"]["write"] = round((time.perf_counter() - t0) * 1e3, 3)
    record.update({"input_sha256": digest, "files": files, "written": _now()})
    write_atomic(outbox / f"{key}.json", _json_bytes(record))  # the completion mark
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


# ----------------------------------------------------------------------- command line

EPILOG = """\
files: for each image NAME that lands in INBOX (names starting with '.' or ending in
.tmp/.part are left alone until renamed): OUTBOX/NAME.<hash>.mask.png (255 background,
128 disc rim, 0 cup, at the image's size), .overlay.png, and .json (disc/cup areas,
vCDR, timings of adapt and predict, theta version, drift, resets), written atomically;
then NAME moves to INBOX/processed/ (or INBOX/rejected/ with NAME.reason.txt).
The adapted state lives in STATE (default OUTBOX/.state); a restart resumes from it.
"""


def register(subparsers) -> dict:
    from .runtime.serving import BACKENDS, ORT_DEVICES, PRECISIONS
    s = subparsers.add_parser(
        "serve", help="adapt and segment images as they arrive in a folder",
        description="Watch an inbox folder; adapt the model on each new image (one step "
        "of the method, in arrival order), segment it with the adapted model and write "
        "the results to the outbox. The adapted state is checkpointed atomically and "
        "resumed after a restart or a crash.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--inbox", required=True, type=Path, help="folder images arrive in")
    s.add_argument("--outbox", required=True, type=Path, help="folder results go to")
    s.add_argument("--artifacts", required=True, type=Path,
                   help="exported artifact folder (grata export)")
    s.add_argument("--method", default="grata",
                   help="bn, tent, grata, grata-noalign, grata-fixedlr or source "
                   "(default grata)")
    s.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="prediction backend: tensorrt where installed, else onnxruntime "
                   "(default auto)")
    s.add_argument("--device", default="auto", choices=ORT_DEVICES,
                   help="onnxruntime provider for adapting (and the onnxruntime backend); "
                   "auto: cuda where available, else cpu")
    s.add_argument("--precision", choices=PRECISIONS,
                   help="TensorRT precision (default fp16); onnxruntime serves fp32")
    s.add_argument("--calibration", type=Path, help="folder of images for --precision int8")
    s.add_argument("--state", type=Path, help="state folder (default OUTBOX/.state)")
    s.add_argument("--checkpoint-every", type=int, default=1, metavar="N",
                   help="checkpoint the adapted state every N images (default 1)")
    s.add_argument("--max-drift", type=float, default=DEFAULT_MAX_DRIFT,
                   help="largest |theta - theta0| / |theta0| before a reset to the last "
                   f"good theta (default {DEFAULT_MAX_DRIFT}; 0 disables)")
    s.add_argument("--reset", action="store_true",
                   help="start from the source theta, discarding the saved state")
    s.add_argument("--seed", type=int, default=0, help="seed of the strong augmentation")
    s.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    s.add_argument("--once", action="store_true",
                   help="process the images present (waiting for partial ones), then exit")
    s.add_argument("--poll", type=float, default=0.5, help="seconds between inbox scans")
    s.add_argument("--settle", type=float, default=1.0,
                   help="a file unchanged this long (or across two scans) is complete")
    s.add_argument("--quiet", action="store_true", help="no line per image")
    return {"serve": cmd_serve}


def cmd_serve(args) -> int:
    _check_folders(args.inbox, args.outbox)  # before loading anything
    state = args.state or args.outbox / ".state"
    log = None if args.quiet else _stderr
    session = Session(args.artifacts, state, method=args.method, backend=args.backend,
                      device=args.device, precision=args.precision, threads=args.threads,
                      checkpoint_every=args.checkpoint_every,
                      max_drift=args.max_drift if args.max_drift > 0 else None,
                      seed=args.seed, reset=args.reset, calibration=args.calibration)
    stop = threading.Event()
    previous = {}
    try:
        fallback = getattr(session.predictor, "fallback", None)
        _stderr(f"grata serve: {session.describe()}"
                + (f" (tensorrt not used: {fallback})" if fallback else ""))
        r = session.resumed
        _stderr(f"grata serve: resumed {state}: {r['n_images']} images adapted, theta "
                f"v{r['theta_version']} {r['theta_sha256']}" if r else
                f"grata serve: starting from the source theta "
                f"{theta_digest(session.theta)} (state {state})")
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, lambda *_: stop.set())
            except ValueError:  # not the main thread
                pass
        counts = serve(args.inbox, args.outbox, session, once=args.once, poll_s=args.poll,
                       settle_s=args.settle, stop=stop, log=log)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        session.close()
    _stderr(f"grata serve: {counts['served']} served, {counts['recovered']} recovered, "
            f"{counts['already_served']} already served, {counts['rejected']} rejected, "
            f"{counts['resets']} resets; {session.n_images} images adapted, theta "
            f"v{session.theta_version} {theta_digest(session.theta)}, drift "
            f"{session.drift:.4f}")
    return 0

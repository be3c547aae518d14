"""The adaptive model of one point of care: adapt on an image, predict it, keep state.

``AdaptiveModel(artifacts, state_dir, method="grata", predictor="auto", ...)`` holds the
adapted state; ``AdaptiveModel.process(image)`` adapts on one image (one step of the
method over the artifacts' gradient graphs, the engine), predicts it with the predictor
(`grata.runtime.predictors`: onnxruntime or TensorRT) at the adapted theta and returns
``{"record": {...}, "mask": uint8 [H, W], "pred": bool [2, S, S], "logits": ...}``.
The folder loop over it is `grata.runtime.inbox`.

Safety of the adapted model
---------------------------
Per image: the method's own guard (a non-finite loss, gradient, theta or moment restores
the last good theta and moments), a drift bound (``max_drift``: the relative L2 distance
``|theta - theta0| / |theta0|``; above it theta, the moments and the step count return to
their values before this image, or to the source when those are also too far) and a
finite-prediction check (non-finite logits restore the last good state and predict
again; if they are still non-finite the image is rejected). Every reset is listed in
that image's record (``resets``) and the drift is reported in every record.

Statistics and the safety gate
------------------------------
`method` is a spec (`grata.specs`): ``grata``, ``grata@mix:0.2``, ``tent@ema:0.1+gate``; a
plain name runs under `norm`. ``sample`` and ``source`` predict through the predictor
(onnxruntime or TensorRT); a mixed or stream rule predicts through the engine's own
``infer_mix`` graph on onnxruntime (TensorRT serves ``sample`` / ``source`` only), and
``ema`` moves its stream statistics after each prediction (they are part of the state).
``+gate`` judges each prediction against the source model's (`grata.gate`) and serves the
one chosen; the decision (chosen, reason, scores) is the record's ``gate``.

State
-----
``STATE/state.npz`` holds the method's `state()` (theta, Adam moments, step, guard,
generator state, counters, the stream statistics of ``ema``), the gate's stream window,
the theta version, the last image's key (``last_key``) and
the run's ``config`` (package version, artifact digest, method and its hyperparameters,
seed, predictor, device), also written as ``STATE/config.json``. It is written
atomically; the crash rules that use it are in `grata.runtime.inbox`. A state is refused
unless it was made from the same source theta and method. Only one process may use a
state folder at a time (an exclusive lock on ``STATE/lock``).
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from grata.atomic import remove_temp_files, write_atomic
from grata.digest import array_sha256
from grata.engine_chooser import open_engine
from grata.errors import DataError, GrataError
from grata.norm import NormSpec
from grata.run_config import run_config
from grata.runtime.ort_engine import route
from grata.runtime.predictors import GRAPHS, make_predictor, resolve_ort_device

STATE_FILE = "state.npz"
CONFIG_FILE = "config.json"
LOCK_FILE = "lock"
STATE_FORMAT = 1
RECORD_FORMAT = 1
DEFAULT_MAX_DRIFT = 0.5
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def json_bytes(obj) -> bytes:
    """Indented JSON (no NaN) as UTF-8 bytes with a final newline."""
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode("utf-8")


def now_utc() -> str:
    """The current UTC time, ISO 8601 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def theta_digest(theta) -> str:
    """Short SHA-256 of theta's float32 bytes: tells thetas apart in records and logs."""
    return array_sha256(theta)[:16]


def relative_drift(theta, theta0) -> float:
    """|theta - theta0| / |theta0| (L2 over the whole vector)."""
    t = np.asarray(theta, dtype=np.float64)
    t0 = np.asarray(theta0, dtype=np.float64)
    return float(np.linalg.norm(t - t0) / max(np.linalg.norm(t0), 1e-12))


class EnginePredictor:
    """Predictions through the engine's own graphs under a statistics rule that the
    predictors do not take (``mix``, ``ema``): onnxruntime, fp32, the engine's
    statistics (stored or stream) fed with theta."""

    name = "onnxruntime"
    precision = "fp32"
    fallback: str | None = None

    def __init__(self, engine, norm):
        self.engine, self.norm = engine, norm
        self.size, self.n_theta = engine.size, int(engine.theta0.shape[0])
        self.detail = f"onnxruntime (the engine's infer_mix graph, {norm} statistics)"

    def predict(self, image: np.ndarray, theta: np.ndarray) -> np.ndarray:
        e = self.engine
        if theta is e.theta:
            return e.infer(image, norm=self.norm)
        saved = e.copy(e.theta)
        e.assign(e.theta, theta)
        try:
            return e.infer(image, norm=self.norm)
        finally:
            e.assign(e.theta, saved)


def exclusive_lock(path, busy: str, folder: bool = False) -> int:
    """An exclusive advisory lock (flock) on `path` (a lock file, made if missing, or
    with `folder` an existing folder itself), held until the returned descriptor is
    closed; GrataError(`busy`) when another process holds it, or one line when the path
    cannot be opened."""
    flags = os.O_RDONLY if folder else os.O_RDWR | os.O_CREAT
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise GrataError(f"cannot lock {path}: {exc.strerror or type(exc).__name__}") \
            from None
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise GrataError(busy) from None
    return fd


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


class AdaptiveModel:
    """The adapted model of one point of care: adapt and predict image by image.

    `state_dir` (optional) holds ``state.npz``, checkpointed atomically every
    `checkpoint_every` images and by `checkpoint()` / `close()`; a model started on it
    resumes from it (see the module docstring). `reset=True` starts from the source
    theta and overwrites the state at once. `predictor`: ``auto``, ``onnxruntime`` or
    ``tensorrt``; `device`: onnxruntime's provider for the adaptation (and for the
    onnxruntime predictor): ``auto``, ``cpu``, ``cuda``, ``tensorrt``. `precision` and
    `calibration` (images or a folder of them, for int8) go to TensorRT. `max_drift=None`
    disables the drift bound. `hyperparameters` are the method's (validated against its
    constructor, recorded in `config`). `method` is a spec (``grata@mix:0.2+gate``); a plain
    name runs under `norm` (a `grata.norm` rule); `gate` (a `grata.gate.GateConfig`) sets
    the gate of a ``+gate`` spec.
    """

    def __init__(self, artifacts, state_dir=None, method: str = "grata",
                 predictor: str = "auto", *, device: str = "auto", precision: str | None = None,
                 threads: int | None = None, checkpoint_every: int = 1,
                 max_drift: float | None = DEFAULT_MAX_DRIFT, seed: int = 0,
                 reset: bool = False, calibration=None, cache_dir=None, verify: bool = True,
                 hyperparameters: dict | None = None, norm="sample", gate=None,
                 roi=None):
        from grata.gate import Gate, GateConfig
        from grata.methods import create, resolved_hyperparameters
        from grata.specs import parse_spec

        self.spec = parse_spec(method, norm)
        self.roi = roi  # grata.data.RoiOptions: the images are whole photographs
        hyperparameters = resolved_hyperparameters(self.spec.method, hyperparameters)
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
            # host arrays on every provider: the predictors take theta from the host
            self.engine = open_engine(artifacts, ort_device, threads, verify,
                                      host_arrays=True)
            self.size = self.engine.size
            self.method = create(self.spec.method, self.engine, norm=self.spec.norm,
                                 seed=seed, **hyperparameters)
            self.gate = Gate(gate or GateConfig()) if self.spec.gate else None
            self._stats_prev = None  # ema: the stream statistics the last image was served at
            graph = GRAPHS.get(self.method.norm)
            if graph is None:  # mix / ema: only the engine's mixed graph takes the rule
                if predictor == "tensorrt" or precision not in (None, "fp32"):
                    raise GrataError(f"the tensorrt predictor serves sample and source "
                                     f"statistics only, not {self.method.norm}; use "
                                     f"--predictor onnxruntime (fp32)")
                route(self.engine, "infer", self.method.norm)  # a missing graph fails here
                self.predictor = EnginePredictor(self.engine, self.method.norm)
            else:
                if isinstance(calibration, (str, Path)):
                    calibration = self._calibration_images(Path(calibration))
                self.predictor = make_predictor(
                    predictor, artifacts, graph=graph, device=ort_device, threads=threads,
                    precision=precision, session=self.engine.sessions.get(graph),
                    cache_dir=cache_dir, calibration=calibration, verify=False)
            self.source_sha256 = array_sha256(self.engine.theta0)
            self.config = run_config(
                artifacts=self.engine.manifest, seed=seed, size=self.size,
                engine=self.engine.kind, device=ort_device,
                methods={self.spec.key: hyperparameters}, norm=NormSpec(norm),
                specs=[self.spec], gate=self.gate.config if self.gate else None,
                predictor=self.predictor.name, precision=self.predictor.precision,
                max_drift=self.max_drift, checkpoint_every=self.checkpoint_every,
                roi="auto" if roi is not None else "none",
                **({"roi_threshold": roi.threshold} if roi is not None else {}))
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
                write_atomic(self.state_dir / CONFIG_FILE, json_bytes(self.config))
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
        return (f"method {self.spec.key} ({self.method.norm} statistics; adapting on "
                f"onnxruntime {adapt}); serving on "
                f"{getattr(p, 'detail', p.name)} ({p.precision})")

    # -- one image -----------------------------------------------------------------
    def process(self, image, *, name: str | None = None, key: str | None = None) -> dict:
        """Adapt on `image` (a file path, the file's bytes, or a model input [3, S, S]
        in [0, 1]), then predict it at the adapted theta. Raises `DataError` for an
        unusable image (the state is then as before)."""
        t0 = time.perf_counter()
        img, name, size_wh, photo = self._load(image, name)
        x = self.engine.to_input(img)
        t_load = time.perf_counter() - t0
        e, m = self.engine, self.method
        snap = m.state()
        n_events = len(snap["events"])
        t1 = time.perf_counter()
        try:
            m.update(x, image=img)  # the predictor makes the prediction (timed on its own)
        except BaseException:
            m.load_state(snap)  # an update that failed half-way leaves no trace
            raise
        t_adapt = time.perf_counter() - t1
        resets = [{"reason": ev.get("event", "non-finite"), "action": ev.get("action")}
                  for ev in m.events[n_events:]]
        drift = self.drift
        if self.max_drift is not None and not drift <= self.max_drift:
            resets.append(self._restore(snap, "drift", drift=drift,
                                        max_drift=self.max_drift))
        if not np.array_equal(e.to_numpy(e.theta), snap["theta"]):
            self.theta_version += 1
        t2 = time.perf_counter()
        logits = np.asarray(self.predictor.predict(x, e.theta))
        if not np.isfinite(logits).all():
            if np.array_equal(e.to_numpy(e.theta), snap["theta"]):
                raise DataError(name, "the prediction is not finite (at the last good theta)")
            resets.append(self._restore(snap, "non-finite prediction"))
            self.theta_version += 1
            logits = np.asarray(self.predictor.predict(x, e.theta))
            if not np.isfinite(logits).all():
                raise DataError(name, "the prediction is not finite even at the last good "
                                      "theta")
        t_predict = time.perf_counter() - t2
        decision, t_gate = None, 0.0
        if self.gate is not None:
            t3 = time.perf_counter()
            logits, decision = self._judge(x, logits, self.gate)
            t_gate = time.perf_counter() - t3
        if m.norm.kind == "ema":
            self._stats_prev = e.norm_state()
            m.update_stream()  # after the prediction: the estimate moves to this image
        self.n_images += 1
        self.last_key = key or name
        self._dirty = True
        timings = {"load": t_load, "adapt": t_adapt, "predict": t_predict}
        if decision is not None:
            timings["gate"] = t_gate
        out = self._result(img, logits, name, key, size_wh, resets, timings,
                           recovered=False, gate=decision, photo=photo)
        if self.state_dir is not None and self.n_images % self.checkpoint_every == 0:
            self.checkpoint()
        return out

    def _judge(self, x, logits, gate) -> tuple[np.ndarray, dict]:
        """The gate's choice between `logits` (the adapted prediction of x) and the source
        model's prediction, and its decision."""
        from grata.gate import gated_predict, source_logits
        e = self.engine
        # the view passes overwrite the image statistics a stream rule moves to
        img_stats = e.copy(e.img_stats) if self.method.norm.kind == "ema" else None
        chosen, _, _, decision = gated_predict(
            gate, x, lambda xh: np.asarray(self.predictor.predict(xh, e.theta)),
            lambda xh: np.asarray(source_logits(e, xh)), adapted_logits=logits)
        if img_stats is not None:
            e.assign(e.img_stats, img_stats)
        return chosen, decision

    def recover(self, image, *, name: str | None = None, key: str | None = None) -> dict:
        """The result of an image whose update the state already holds: a prediction at
        the current theta (``ema``: at the stream statistics it was served at), without
        adapting (the state does not change; the gate judges on a copy of its window)."""
        import copy
        t0 = time.perf_counter()
        img, name, size_wh, photo = self._load(image, name)
        x = self.engine.to_input(img)
        t_load = time.perf_counter() - t0
        e = self.engine
        t2 = time.perf_counter()
        stream = self.method.norm.kind == "ema" and self._stats_prev is not None
        if stream:
            now = e.norm_state()
            e.load_norm_state(self._stats_prev)
        try:
            logits = np.asarray(self.predictor.predict(x, e.theta))
            if not np.isfinite(logits).all():
                raise DataError(name, "the prediction is not finite")
            t_predict = time.perf_counter() - t2
            decision = None
            if self.gate is not None:
                logits, decision = self._judge(x, logits, copy.deepcopy(self.gate))
        finally:
            if stream:
                e.load_norm_state(now)
        return self._result(img, logits, name, key, size_wh, [],
                            {"load": t_load, "adapt": 0.0, "predict": t_predict},
                            recovered=True, gate=decision, photo=photo)

    def reset(self) -> None:
        """Back to the source theta: fresh moments, step count and augmentation stream
        (checkpointed at once when there is a state folder)."""
        self.method.reset()
        if self.gate is not None:
            self.gate.reset()
        self._stats_prev = None
        self.theta_version += 1
        self.n_images = 0
        self.last_key = None
        self._dirty = True
        if self.state_dir is not None:
            self.checkpoint()

    def _restore(self, snap: dict, reason: str, **info) -> dict:
        """theta, moments and step back to `snap` (a `Method.state()` taken before this
        image), or to the source when `snap` is itself beyond max_drift; the generator
        and the counters go on."""
        e, m = self.engine, self.method
        state = m.state()
        back = {k: snap[k] for k in ("theta", "m", "v", "t")}
        action = "restored the last good theta, moments and step"
        if self.max_drift is not None and \
                relative_drift(back["theta"], e.theta0) > self.max_drift:
            zeros = np.zeros_like(back["theta"])
            back = {"theta": e.to_numpy(e.theta0), "m": zeros, "v": zeros, "t": 0}
            action = "reset to the source theta (the last good one is beyond max_drift)"
        # the guard's last good state is taken again from the restored one at the next step
        m.load_state({**state, **back, "good": None})
        return {"reason": reason, **{k: _finite_or_none(v) for k, v in info.items()},
                "action": action}

    def _load(self, image, name: str | None):
        from PIL import Image

        from grata.data import load_image
        S = self.size
        if isinstance(image, np.ndarray):
            img = np.ascontiguousarray(image, dtype=np.float32)
            if img.shape != (3, S, S):
                raise DataError(name or "array", f"expected a [3, {S}, {S}] image, got "
                                                  f"{list(img.shape)}")
            if not np.isfinite(img).all():
                raise DataError(name or "array", "image has non-finite values")
            return img, name or "array", (S, S), None
        if isinstance(image, (bytes, bytearray)):
            data, name = bytes(image), name or "image"
        else:
            path = Path(image)
            name = name or path.name
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DataError(path, f"cannot read: {exc.strerror or exc}") from None
        if self.roi is not None:
            return self._load_photo(data, name)
        try:
            img = load_image(io.BytesIO(data), S)
        except DataError as exc:
            raise DataError(name, exc.problem) from None
        with Image.open(io.BytesIO(data)) as im:
            size_wh = im.size
        return img, name, size_wh, None

    def _load_photo(self, data: bytes, name: str):
        """A whole photograph: the disc localised, the ROI cut and resized to S. A
        photograph whose disc is not found is a DataError (rejected with the reason)."""
        from grata.data import load_photo, photo_sample
        from grata.roi import RoiRejected
        try:
            pixels = load_photo(io.BytesIO(data))
            empty = np.zeros((2,) + pixels.shape[:2], bool)  # no truth when serving
            sample = photo_sample(name, pixels, empty, self.size, self.roi)
        except DataError as exc:
            raise DataError(name, exc.problem) from None
        except RoiRejected as exc:
            raise DataError(name, exc.reason) from None
        H, W = pixels.shape[:2]
        return sample.image, name, (W, H), sample.photo

    def _result(self, img, logits, name, key, size_wh, resets, timings, recovered,
                gate: dict | None = None, photo=None) -> dict:
        from PIL import Image

        from grata.data import to_mask_png
        from grata.metrics import binarize, probs_from_logits, vertical_cdr
        pred = binarize(probs_from_logits(np.asarray(logits, np.float32)[0]))
        full = None
        if photo is not None:  # a whole photograph: the crop's mask pasted back in its box
            from grata.photo import paste_prediction
            full = paste_prediction(pred, photo.box, photo.shape)
            mask = to_mask_png(full)
        else:
            mask = to_mask_png(pred)
        if photo is None and tuple(size_wh) != (self.size, self.size):  # the picture's size
            mask = np.asarray(Image.fromarray(mask).resize(tuple(size_wh), Image.NEAREST))
        disc, cup = mask < 255, mask == 0
        m = self.method
        record = {
            "format_version": RECORD_FORMAT, "image": name, "key": key,
            "method": self.spec.key, "norm": str(m.norm), "predictor": self.predictor.name,
            "precision": self.predictor.precision, "model_size": self.size,
            "image_size": [int(size_wh[0]), int(size_wh[1])],
            "disc_area_px": int(disc.sum()), "cup_area_px": int(cup.sum()),
            "disc_area_fraction": float(disc.mean()), "cup_area_fraction": float(cup.mean()),
            "vcdr": _finite_or_none(vertical_cdr(np.stack([disc, cup]))),
            "timings_ms": {k: round(v * 1e3, 3) for k, v in timings.items()},
            "theta_version": self.theta_version,
            "theta_sha256": theta_digest(self.engine.to_numpy(self.engine.theta)),
            "theta_drift": _finite_or_none(self.drift), "max_drift": self.max_drift,
            "step": int(m.steps), "images_adapted": self.n_images,
            "losses": {k: _finite_or_none(v) for k, v in m.last.items()} if not recovered
            else {},
            "resets": resets, "recovered": recovered,
        }
        if gate is not None:  # which prediction was served, why, and both scores
            record["gate"] = gate
        if photo is not None:  # where the disc was found and the ROI cut
            record["roi"] = photo.record
        return {"record": record, "mask": mask, "pred": pred, "logits": logits, "image": img,
                "photo": photo, "pred_full": full}

    def _calibration_images(self, folder: Path) -> list[np.ndarray]:
        from grata.data import load_image
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
        st = self.method.state()
        good = st["good"]
        arrays = {
            "format_version": np.int64(STATE_FORMAT),
            "theta": st["theta"], "m": st["m"], "v": st["v"],
            "t": np.int64(st["t"]), "n_images": np.int64(self.n_images),
            "n_seen": np.int64(st["n_seen"]),
            "theta_version": np.int64(self.theta_version),
            "rng": np.array(json.dumps(st["rng"])),
            "events": np.array(json.dumps(st["events"])),
            "source_sha256": np.array(self.source_sha256), "method": np.array(st["method"]),
            "seed": np.int64(st["seed"]), "last_key": np.array(self.last_key or ""),
            "config": np.array(json.dumps(self.config)),
            "written": np.array(now_utc()),
        }
        arrays["norm"] = np.array(str(self.method.norm))
        if st.get("stats") is not None:  # ema: the stream statistics (and the last image's)
            arrays["stats"] = st["stats"]
            if self._stats_prev is not None:
                arrays["stats_prev"] = np.asarray(self._stats_prev, np.float32)
        if self.gate is not None:
            arrays["gate"] = np.array(json.dumps(self.gate.state()))
        if good is not None:
            arrays.update({"good_theta": good["theta"], "good_m": good["m"],
                           "good_v": good["v"], "good_t": np.int64(good["t"])})
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
            events = json.loads(str(st["events"])) if "events" in st else []
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
        saved_norm = str(st["norm"]) if "norm" in st else "sample"
        if m.name != "source" and saved_norm != str(m.norm):
            raise GrataError(f"state {path} was adapted under {saved_norm} statistics, not "
                             f"{m.norm}; {hint}")
        if not (theta.shape == mm.shape == vv.shape == e.theta0.shape):
            raise GrataError(f"state {path}: theta has shape {theta.shape}, the artifacts "
                             f"{e.theta0.shape}; {hint}")
        good = None
        if "good_theta" in st:
            good = {"theta": st["good_theta"], "m": st["good_m"], "v": st["good_v"],
                    "t": int(st["good_t"])}
        self.n_images = int(st["n_images"])
        m.load_state({"theta": theta, "m": mm, "v": vv, "t": int(st["t"]), "good": good,
                      "rng": rng_state, "events": events,
                      "n_seen": int(st["n_seen"]) if "n_seen" in st else self.n_images,
                      "stats": st.get("stats")})
        self._stats_prev = st.get("stats_prev")
        if self.gate is not None and "gate" in st:
            self.gate.load_state(json.loads(str(st["gate"])))
        self.theta_version = int(st["theta_version"])
        self.last_key = str(st["last_key"]) or None
        self.resumed = {"n_images": self.n_images, "theta_version": self.theta_version,
                        "step": m.steps, "theta_sha256": theta_digest(theta),
                        "written": str(st.get("written", ""))}

    def _lock(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GrataError(f"state {self.state_dir} cannot be made: "
                             f"{exc.strerror or type(exc).__name__}") from None
        self._lock_fd = exclusive_lock(
            self.state_dir / LOCK_FILE,
            f"state {self.state_dir} is in use by another grata serve")
        remove_temp_files(self.state_dir)

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

    def __enter__(self) -> AdaptiveModel:  # noqa: PYI034  (Python 3.10 has no typing.Self)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

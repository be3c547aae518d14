"""The adaptive model of one point of care: adapt on an image, predict it, keep state.

``AdaptiveModel(artifacts, state_dir, method="grata", predictor="auto", ...)`` holds the
adapted state; ``AdaptiveModel.process(image)`` runs one image through the per-image
pipeline (`grata.pipeline.ImagePipeline`: load, locate, adapt, predict, gate, stream,
paste back) and returns ``{"record": {...}, "mask": uint8 [H, W], "pred": bool [2, S, S],
"logits": ...}`` (`grata.runtime.record`). The folder loop over it is
`grata.runtime.inbox`. Serving adds only what serving needs around the pipeline, each in
its own module:

- the predictor (`grata.runtime.serving_predictor`): onnxruntime or TensorRT at the
  adapted theta for ``sample`` / ``source`` statistics; the engine's own ``infer_mix``
  graph on onnxruntime for a mixed or stream rule (TensorRT serves ``sample`` / ``source``
  only); ``ema`` moves its stream statistics after each prediction (part of the state);
- the guards (`grata.runtime.guards`): the method's own guard, a drift bound
  (``max_drift``) and a finite-prediction check; every reset is listed in the image's
  record (``resets``) and the drift is reported in every record;
- the state (`grata.runtime.state_file`): ``STATE/state.npz`` holds the method's
  `state()` and serving's counters (theta version, images, the last image's key, the
  gate's window, the run's ``config``, also written as ``STATE/config.json``); written
  atomically every `checkpoint_every` images; a state is refused unless it was made from
  the same source theta and method; the crash rules that use it are in
  `grata.runtime.inbox`;
- the lock (`grata.runtime.state_lock`): only one process may use a state folder at a
  time (an exclusive lock on ``STATE/lock``).

With ``scale="auto"`` the images are crops of any scale: the locate step re-crops each so
the disc has the model's training size (`grata.scale_stage.ScaleLocator`, the scale from
the artifacts' manifest or `disc_scale`); the record's ``scale`` says box, factor and how,
and the running estimate is part of the state. With ``roi`` too the images are whole
photographs placed at that scale (`grata.photo_scale.PhotoScaleLocator`; the record's
``roi`` holds the box, the localiser's fields and the scale decision). A model whose
scale is unknown serves the crops as given, the photographs at the benchmark's ROI
(`scale_line` says so).

`method` is a spec (`grata.specs`): ``grata``, ``grata@mix:0.2``, ``tent@ema:0.1+gate``; a
plain name runs under `norm`. ``+gate`` judges each prediction against the source model's
(`grata.gate`) and serves the one chosen; the decision (chosen, reason, scores) is the
record's ``gate``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from grata.atomic import remove_temp_files, write_atomic
from grata.domains import RoiOptions
from grata.digest import array_sha256
from grata.disc_scale import model_scale
from grata.engine_chooser import open_engine
from grata.errors import GrataError
from grata.gate import Gate, GateConfig
from grata.methods import create, resolved_hyperparameters
from grata.norm import NormSpec
from grata.photo import RoiLocator
from grata.photo_scale import PhotoScaleLocator
from grata.picture import PictureReader
from grata.pipeline import ImagePipeline
from grata.run_config import run_config
from grata.runtime.guards import DEFAULT_MAX_DRIFT, Guards, relative_drift
from grata.runtime.predictors import resolve_ort_device
from grata.runtime.record import json_bytes, serve_result, theta_digest
from grata.runtime.serving_predictor import serving_predictor
from grata.runtime.state_file import (
    CONFIG_FILE,
    STATE_FILE,
    check_state,
    read_state,
    write_state,
)
from grata.runtime.state_lock import exclusive_lock
from grata.scale_stage import ScaleLocator, source_predict
from grata.specs import parse_spec

LOCK_FILE = "lock"


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
    the gate of a ``+gate`` spec. `roi` (a `grata.domains.RoiOptions`): the images are whole
    photographs, placed by the pipeline's locate step (`grata.photo.RoiLocator`).
    `scale` ``auto``: crops of any scale, re-cropped to the model's disc scale (the
    manifest's, or `disc_scale`: the diameter over the crop's side); with `roi`, whole
    photographs placed at that scale (`grata.photo_scale.PhotoScaleLocator`).
    """

    def __init__(self, artifacts, state_dir=None, method: str = "grata",
                 predictor: str = "auto", *, device: str = "auto", precision: str | None = None,
                 threads: int | None = None, checkpoint_every: int = 1,
                 max_drift: float | None = DEFAULT_MAX_DRIFT, seed: int = 0,
                 reset: bool = False, calibration=None, cache_dir=None, verify: bool = True,
                 hyperparameters: dict | None = None, norm="sample", gate=None,
                 roi: RoiOptions | None = None, scale: str = "none",
                 disc_scale: float | None = None):
        self.spec = parse_spec(method, norm)
        self.roi = roi
        if scale not in ("none", "auto"):
            raise GrataError(f"scale must be 'none' or 'auto', not {scale!r}")
        hyperparameters = resolved_hyperparameters(self.spec.method, hyperparameters)
        if int(checkpoint_every) < 1:
            raise GrataError(f"checkpoint_every must be at least 1, not {checkpoint_every}")
        self.guards = Guards(max_drift)
        self.checkpoint_every = int(checkpoint_every)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._lock_fd = None
        if self.state_dir is not None:
            self._lock()
        try:
            ort_device = resolve_ort_device(device)
            # on cuda: theta, moments and gradients stay on the GPU (the fused update)
            self.engine = open_engine(artifacts, ort_device, threads, verify)
            self.size = self.engine.size
            self.method = create(self.spec.method, self.engine, norm=self.spec.norm,
                                 seed=seed, **hyperparameters)
            self.gate = Gate(gate or GateConfig()) if self.spec.gate else None
            self.predictor = serving_predictor(
                self.engine, self.method.norm, predictor, artifacts, device=ort_device,
                threads=threads, precision=precision, calibration=calibration,
                cache_dir=cache_dir)
            locator = RoiLocator(self.size, roi) if roi is not None else None
            self.disc_scale, self.scale_line = None, ""
            if scale == "auto":
                self.disc_scale, self.scale_line = model_scale(self.engine.manifest, None,
                                                               disc_scale)
            if self.disc_scale is not None:
                predict = source_predict(self.engine)
                locator = ScaleLocator(self.size, self.disc_scale, predict) if roi is None \
                    else PhotoScaleLocator(self.size, self.disc_scale, predict, roi)
            self.scale_locator = locator if self.disc_scale is not None else None
            self.pipeline = ImagePipeline(
                self.method, gate=self.gate, predict=self._predict,
                reader=PictureReader(self.size, locator), guard=self.guards,
                keep_served_stats=True)
            self.source_sha256 = array_sha256(self.engine.to_numpy(self.engine.theta0))
            self.config = run_config(
                artifacts=self.engine.manifest, seed=seed, size=self.size,
                engine=self.engine.kind, device=ort_device,
                methods={self.spec.key: hyperparameters}, norm=NormSpec(norm),
                specs=[self.spec], gate=self.gate.config if self.gate else None,
                predictor=self.predictor.name, precision=self.predictor.precision,
                max_drift=self.max_drift, checkpoint_every=self.checkpoint_every,
                roi="auto" if roi is not None else "none",
                **({"roi_threshold": roi.threshold} if roi is not None else {}),
                scale="none" if self.disc_scale is None else "auto",
                **({"disc_scale": self.disc_scale.to_json()} if self.disc_scale else {}))
            self.n_images = 0
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
        e = self.engine
        return relative_drift(e.to_numpy(e.theta), e.to_numpy(e.theta0))

    @property
    def max_drift(self) -> float | None:
        """The drift bound of the guards (None: none)."""
        return self.guards.max_drift

    @max_drift.setter
    def max_drift(self, value: float | None) -> None:
        self.guards.max_drift = value

    @property
    def theta_version(self) -> int:
        """How many new thetas the state has taken (steps that moved it, restores, resets)."""
        return self.guards.theta_version

    @theta_version.setter
    def theta_version(self, value: int) -> None:
        self.guards.theta_version = int(value)

    def describe(self) -> str:
        p = self.predictor
        adapt = self.engine.sessions["entropy_grad"].get_providers()[0]
        return (f"method {self.spec.key} ({self.method.norm} statistics; adapting on "
                f"onnxruntime {adapt}); serving on "
                f"{getattr(p, 'detail', p.name)} ({p.precision})")

    def _predict(self, x):
        """The pipeline's predict step: the serving predictor at the current theta."""
        return np.asarray(self.predictor.predict(x, self.engine.theta))

    # -- one image -----------------------------------------------------------------
    def process(self, image, *, name: str | None = None, key: str | None = None) -> dict:
        """Adapt on `image` (a file path, the file's bytes, or a model input [3, S, S]
        in [0, 1]), then predict it at the adapted theta. Raises `DataError` for an
        unusable image (the state is then as before)."""
        t0 = time.perf_counter()
        picture = self.pipeline.load(image, name)
        x = self.engine.to_input(picture.image)
        t_load = time.perf_counter() - t0
        out = self.pipeline.step(x, picture.image, picture.name)
        self.n_images += 1
        self.last_key = key or picture.name
        self._dirty = True
        self.pipeline.paste_back(out, picture.placement)
        result = serve_result(self, picture, out, key, {"load": t_load, **out.timings},
                              recovered=False)
        if self.state_dir is not None and self.n_images % self.checkpoint_every == 0:
            self.checkpoint()
        return result

    def recover(self, image, *, name: str | None = None, key: str | None = None) -> dict:
        """The result of an image whose update the state already holds: a prediction at
        the current theta (``ema``: at the stream statistics it was served at), without
        adapting (the state does not change; the gate judges on a copy of its window)."""
        t0 = time.perf_counter()
        stream = None if self.scale_locator is None else self.scale_locator.stream_state()
        try:
            picture = self.pipeline.load(image, name)
        finally:  # the image's scale estimate is already in the state
            if stream is not None:
                self.scale_locator.load_stream(stream)
        x = self.engine.to_input(picture.image)
        t_load = time.perf_counter() - t0
        out = self.pipeline.paste_back(self.pipeline.replay(x, picture.name),
                                       picture.placement)
        return serve_result(self, picture, out, key, {"load": t_load, **out.timings},
                            recovered=True)

    def reset(self) -> None:
        """Back to the source theta: fresh moments, step count and augmentation stream
        (checkpointed at once when there is a state folder)."""
        self.pipeline.reset()
        self.theta_version += 1
        self.n_images = 0
        self.last_key = None
        self._dirty = True
        if self.state_dir is not None:
            self.checkpoint()

    # -- state ---------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Write the adapted state atomically (no-op without a state folder)."""
        if self.state_dir is None:
            return
        write_state(self.state_dir, self.method.state(), {
            "n_images": self.n_images, "theta_version": self.theta_version,
            "last_key": self.last_key, "source_sha256": self.source_sha256,
            "norm": str(self.method.norm), "config": self.config,
            "gate": self.gate.state() if self.gate is not None else None,
            "stats_prev": None if self.pipeline.served_stats is None
            else self.engine.to_numpy(self.pipeline.served_stats),
            "scale_stream": None if self.scale_locator is None
            else self.scale_locator.stream_state()})
        self._dirty = False

    def _load_state(self) -> None:
        path = self.state_dir / STATE_FILE
        st, serving = read_state(path)
        m = self.method
        check_state(path, st, serving, source_sha256=self.source_sha256, method=m.name,
                    norm=str(m.norm), theta_shape=self.engine.theta0.shape)
        self.n_images = serving["n_images"]
        m.load_state(st)
        self.pipeline.served_stats = serving["stats_prev"]
        if self.gate is not None and serving["gate"] is not None:
            self.gate.load_state(serving["gate"])
        if self.scale_locator is not None and serving["scale_stream"] is not None:
            self.scale_locator.load_stream(serving["scale_stream"])
        self.theta_version = serving["theta_version"]
        self.last_key = serving["last_key"]
        self.resumed = {"n_images": self.n_images, "theta_version": self.theta_version,
                        "step": m.steps, "theta_sha256": theta_digest(st["theta"]),
                        "written": serving["written"]}

    # -- the lock ------------------------------------------------------------------
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


__all__ = ["AdaptiveModel", "LOCK_FILE"]

"""One image through one method: the per-image pipeline that `grata adapt`, `grata serve`
and `grata bench` run, each step a method of `ImagePipeline`:

    load        the picture as given: a file, its bytes or a model input (`load`, by
                `grata.picture.PictureReader`); the reader's sample in `grata adapt`
                (`grata.picture.picture_of`)
    locate      where the model's input sits in the picture (`grata.placement.Locator`:
                `grata.photo.RoiLocator` for whole photographs; none for a crop)
    adapt       one update of the method on the input (`adapt`)
    predict     the prediction at the adapted theta (`predict`: the engine's own graph,
                or the serving predictor)
    gate        the safety gate's choice between it and the source model's (`judge`)
    stream      ``ema``: the stream statistics move to this image (`follow_stream`)
    paste back  the prediction at the picture's size (`paste_back`)
    record      the verb's own: `grata.adapt` scores the image into a report row,
                `grata.runtime.record` writes the serve record; both carry the
                placement's record (what the locate step decided)

`step` runs adapt -> predict -> gate -> stream on a model input, `process` the whole
image. Serving adds its guards between the steps (`guard`: a
`grata.runtime.guards.Guards`: the update rolled back when it fails, the drift bound,
the finite-prediction check) and keeps the statistics a prediction was served at
(`keep_served_stats`) so a crash can be recovered (`replay`).

A new stage between load and adapt (a re-crop that gives the disc the model's training
size) is one more Locator, its paste back the Placement it returns, its decision the
placement's record; nothing here changes. Torch-free; decodes no image itself (the
reader does), so `grata bench` times the engine's steps without the image libraries.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from grata import metrics
from grata.errors import DataError
from grata.gate import gated_predict, source_logits

if TYPE_CHECKING:  # the engine steps alone (grata bench) need no image decoding
    from grata.picture import Picture, PictureReader
    from grata.placement import Placement


@dataclass
class Outcome:
    """What one image's steps gave: the logits served ([1, 2, S, S]; host arrays when a
    predictor or the gate made them), the gate's decision and both of its candidates
    (host [1, 2, S, S] each; None without a gate), the guards' resets, the seconds of
    each step, how many new theta values the image made (counted under guards), and
    after `paste_back` the bool masks at the model's size (`pred`) and at the picture's
    (`full`)."""

    logits: Any
    decision: dict | None = None
    pair: tuple | None = None
    resets: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    theta_versions: int = 0
    pred: np.ndarray | None = None
    full: np.ndarray | None = None


class ImagePipeline:
    """The steps of one image for one method over its engine (see the module docstring).

    `gate` (a `grata.gate.Gate`) judges each prediction; `predict(x)` makes the
    prediction of the model input x at the current theta (default: the engine's own graph
    under the method's statistics); `reader` (a `grata.picture.PictureReader`) loads
    images and places them (its locator); `guard` and `keep_served_stats` are serving's."""

    def __init__(self, method, *, gate=None, predict: Callable | None = None,
                 reader: PictureReader | None = None, guard=None,
                 keep_served_stats: bool = False):
        self.method, self.gate, self.reader, self.guard = method, gate, reader, guard
        self._predict = predict
        self.keep_served_stats = keep_served_stats
        self.served_stats = None  # ema: the stream statistics the last image was served at

    @property
    def engine(self):
        return self.method.engine

    def reset(self) -> None:
        """A new stream: the method back to the source, the gate's window and the
        locator's estimate forgotten."""
        self.method.reset()
        if self.gate is not None:
            self.gate.reset()
        if self.reader is not None:
            self.reader.reset()
        self.served_stats = None

    def load(self, image, name: str | None = None) -> Picture:
        """The load and locate steps (`grata.picture.PictureReader.load`): a file, its
        bytes or a model input -> Picture."""
        return self.reader.load(image, name)

    # -- the engine's steps ------------------------------------------------------------
    def adapt(self, x, image: np.ndarray, snap: dict | None = None) -> list[dict]:
        """One update of the method on x (`image`: the same image on the host). Under
        guards (`snap`: the method's state before it) a failed update leaves no trace and
        the guards' resets are returned."""
        m = self.method
        if self.guard is None:
            m.update(x, image=image)
            return []
        try:
            m.update(x, image=image)
        except BaseException:
            m.load_state(snap)
            raise
        return self.guard.after_update(m, snap)

    def predict(self, x):
        """The logits [1, 2, S, S] of x at the current theta."""
        if self._predict is not None:
            return self._predict(x)
        return self.engine.infer(x, norm=self.method.norm)

    def judge(self, x, logits, gate) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        """The gate's choice between `logits` (the adapted prediction of x) and the source
        model's: (chosen, adapted, source host logits, decision). The gate's view passes
        leave the image statistics of a stream rule as the prediction set them."""
        e, m = self.engine, self.method
        img_stats = e.copy(e.img_stats) if m.norm.kind == "ema" else None
        out = gated_predict(
            gate, e.to_numpy(x),
            lambda xh: e.to_numpy(self.predict(e.to_input(xh))),
            lambda xh: e.to_numpy(source_logits(e, e.to_input(xh))),
            adapted_logits=e.to_numpy(logits))
        if img_stats is not None:
            e.assign(e.img_stats, img_stats)
        return out

    def follow_stream(self) -> None:
        """``ema``: the stream statistics move to the predicted image's (after the
        prediction, so it was made at the estimate before this image)."""
        if self.method.norm.kind != "ema":
            return
        if self.keep_served_stats:
            self.served_stats = self.engine.copy(self.engine.stats)  # no host sync for it
        self.method.update_stream()

    def step(self, x, image: np.ndarray, name: str = "image") -> Outcome:
        """adapt -> predict -> gate -> stream on the model input x."""
        e, m, guard = self.engine, self.method, self.guard
        snap = m.state() if guard is not None else None
        t0 = time.perf_counter()
        resets = self.adapt(x, image, snap)
        t1 = time.perf_counter()
        versions = 0
        if snap is not None and not np.array_equal(e.to_numpy(e.theta), snap["theta"]):
            versions = 1
        logits = self.predict(x)
        if guard is not None:
            logits, more = guard.check_prediction(self, x, logits, snap, name)
            resets += more
            versions += len(more)
        t2 = time.perf_counter()
        out = Outcome(logits, resets=resets, theta_versions=versions,
                      timings={"adapt": t1 - t0, "predict": t2 - t1})
        if self.gate is not None:
            out.logits, adapted, source, out.decision = self.judge(x, logits, self.gate)
            out.pair = (adapted, source)
            out.timings["gate"] = time.perf_counter() - t2
        self.follow_stream()
        return out

    def replay(self, x, name: str = "image") -> Outcome:
        """The prediction of an image whose update the state already holds: at the current
        theta (``ema``: at the statistics it was served at), without adapting; the gate
        judges on a copy of its window, so nothing of the state moves."""
        e = self.engine
        stream = self.method.norm.kind == "ema" and self.served_stats is not None
        if stream:
            now = e.norm_state()
            e.load_norm_state(e.to_numpy(self.served_stats))
        try:
            t0 = time.perf_counter()
            logits = self.predict(x)
            if not np.isfinite(e.to_numpy(logits)).all():
                raise DataError(name, "the prediction is not finite")
            out = Outcome(logits, timings={"adapt": 0.0, "predict": time.perf_counter() - t0})
            if self.gate is not None:
                out.logits, _, _, out.decision = self.judge(x, logits, copy.deepcopy(self.gate))
        finally:
            if stream:
                e.load_norm_state(now)
        return out

    # -- the whole image ---------------------------------------------------------------
    def paste_back(self, out: Outcome, placement: Placement) -> Outcome:
        """The served logits as bool masks: `pred` at the model's size, `full` at the
        picture's (the prediction put back into its box)."""
        logits = np.asarray(self.engine.to_numpy(out.logits))
        out.pred = metrics.binarize(metrics.probs_from_logits(logits[0]))
        out.full = placement.paste(out.pred)
        return out

    def process(self, picture: Picture) -> Outcome:
        """One image, every step: its input to the engine, adapt -> predict -> gate ->
        stream, paste back. ``timings["step"]``: from the input's upload to the host
        prediction."""
        t0 = time.perf_counter()
        x = self.engine.to_input(picture.image)
        out = self.step(x, picture.image, picture.name)
        out.logits = np.asarray(self.engine.to_numpy(out.logits))
        out.timings["step"] = time.perf_counter() - t0
        return self.paste_back(out, picture.placement)


__all__ = ["ImagePipeline", "Outcome"]

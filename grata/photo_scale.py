"""Whole photographs at the model's disc scale: the locate step (`PhotoScaleLocator`, a
`grata.placement.Locator`) for ``--roi auto --scale auto``.

Per photograph, label-free:

1. the classical localiser (`grata.roi.locate_disc`) gives the disc's centre, radius,
   score and the field of view (FOV);
2. a candidate window is cut around that centre, :data:`WINDOW` times the box that would
   give the found disc the model's diameter (``2 r / scale.diameter``), bounded by
   :data:`WINDOW_FOV` times the FOV's diameter so a wrong radius cannot make it absurd
   (no centre found: the FOV's bounding square, or the photograph's);
3. the crops' disc search (`grata.scale_search.locate_disc`, the source model) runs in
   that window, from the localiser's disc as its prior; the box is centred on the disc it
   finds and sized so that the disc has the model's diameter, the disc's diameter being
   the geometric mean of the model's measure and (when the localiser is sure) the
   localiser's ``2 r``: the model alone under-measures a blurred disc
   (benchmarks/roi_end_to_end.py --scale); the box is in the photograph's pixels and the model's input is cut
   from the photograph itself, so a box reaching past the window still shows real pixels;
4. one source pass on that box is the check (its disc's plausibility,
   `grata.scale_search.plausibility`, is the record's ``confidence``) and the stream's
   measurement.

Decision: a localiser score at or above the threshold is accepted (where the model finds
no plausible disc at its scale, the benchmark's ROI is cut as ``--scale none`` would:
``how`` = ``fallback-roi``); a lower score is a second opinion: the photograph is
accepted when the model finds a plausible disc in the candidate window
(``second_opinion`` in the record), refused (`grata.roi.RoiRejected`, both reasons in one
line) only when both fail.

The stream's running estimate (`grata.scale_search.StreamScale`) is kept in units of the
FOV's diameter: one camera has one FOV, and the disc's share of it is anatomy, whereas the
window follows each photograph's own radius. It is reset with the stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from grata import roi
from grata.disc_scale import DiscScale
from grata.domains import RoiOptions
from grata.metrics import probs_from_logits
from grata.placement import Placement

WINDOW = 2.0               # candidate window side / the box of the model's scale
WINDOW_FOV = (0.3, 1.1)    # bounds of the window side, fractions of the FOV diameter
RECORD_KEY = "roi"         # the decision's key in report rows and serve records


class PhotoScaleLocator:
    """The locate step of whole photographs at the model's disc scale
    (`grata.placement.Locator`; see the module).

    `predict(x)` returns the source model's logits of a model input float32 [3, S, S]
    (`grata.scale_stage.source_predict`); `scale` the model's disc scale; `options`
    the localiser's threshold and known discs (``options.discs``: the box is the true
    disc at the model's scale, no search: a benchmark's ceiling)."""

    def __init__(self, size: int, scale: DiscScale, predict: Callable[[np.ndarray], np.ndarray],
                 options: RoiOptions | None = None, stream=None):
        from grata.scale_search import StreamScale  # scipy: grata --help starts without it
        self.size, self.scale, self.predict = size, scale, predict
        self.options = options or RoiOptions()
        self.stream = stream if stream is not None else StreamScale()

    def locate(self, picture: np.ndarray, name: str = "photograph"
               ) -> tuple[np.ndarray, Placement]:
        """A whole photograph (uint8 [H, W, 3]) -> (the model's input float32 [3, S, S],
        its Placement: the box in the photograph's pixels, the record). Raises
        grata.roi.RoiRejected when neither the localiser nor the model finds a disc."""
        from grata.scale_search import recrop
        a = np.asarray(picture)
        known = (self.options.discs or {}).get(name)
        if known is not None:
            return self._known(a, known)
        info = roi.locate_disc(a)
        sure = info["score"] >= self.options.threshold
        window = self._window(a.shape, info)
        box, found, check, n = self._search(a, info, window)
        conf = check[0]
        accepted = conf >= _min_confidence() and found.how != "fallback-none"
        how, reason = found.how, found.reason
        if not accepted:
            if not sure:
                raise roi.RoiRejected(_both(info, self.options.threshold, found, conf), info)
            box = roi.roi_box(a.shape, info, info["fov"])
            how = "fallback-roi"
            reason = reason or f"no plausible disc at the model's scale (plausibility {conf:.2f})"
        elif info["fov"] is not None:
            self._observe(check, box, info["fov"]["d"])
        record = roi.record(info, box)
        record["second_opinion"] = bool(accepted and not sure)
        record["scale"] = {
            "how": how, "factor": round(_roi_side(info) / (box[3] - box[1]), 4)
            if info["fov"] is not None else None,
            "confidence": round(float(conf), 4), "n_forward": n, "reason": reason,
            "window": [int(v) for v in window]}
        return recrop(a, box, self.size), Placement(a.shape[:2], tuple(box), record, a,
                                                    RECORD_KEY)

    def reset(self) -> None:
        """A new stream: the running scale estimate forgotten."""
        self.stream.reset()

    def stream_state(self) -> dict:
        """The running estimate, JSON-safe (a serve state's ``scale_stream``)."""
        return self.stream.state()

    def load_stream(self, state: dict) -> None:
        """Continue the running estimate `stream_state` saved."""
        from grata.scale_search import StreamScale  # scipy: see __init__
        self.stream = StreamScale.from_state(state)

    # -- the steps ---------------------------------------------------------------------
    def _window(self, shape, info) -> tuple[int, int, int, int]:
        """The candidate window (photograph pixels, square, may leave it)."""
        from grata.scale_search import square_box
        H, W = int(shape[0]), int(shape[1])
        fov = info["fov"]
        if not math.isfinite(info["cx"]):  # no candidate: the whole FOV, or photograph
            if fov is None:
                return square_box(W / 2, H / 2, max(H, W))
            return square_box(fov["cx"], fov["cy"], fov["d"])
        side = WINDOW * 2 * info["r"] / self.scale.diameter if math.isfinite(info["r"]) \
            else WINDOW * _roi_side(info)
        lo, hi = (f * fov["d"] for f in WINDOW_FOV)
        return square_box(info["cx"], info["cy"], min(max(side, lo), hi))

    def _search(self, a: np.ndarray, info: dict, window):
        """The crops' disc search inside the window (from the localiser's disc), the box
        mapped to the photograph, and the check pass on it: (box, the search's
        Placement, (plausibility, blob, probabilities), model passes)."""
        from grata.scale_search import cut, locate_disc, square_box
        x0, y0, x1, y1 = window
        win = cut(a, window)
        prior = None
        if math.isfinite(info["cx"]) and math.isfinite(info["r"]):
            prior = (info["cx"] - x0, info["cy"] - y0, 2 * info["r"])
        fov = info["fov"]
        view = None if fov is None or not self.stream.settled else \
            self.stream.rescaled(fov["d"] / (y1 - y0))
        n = 0
        for stream in (view, None) if view is not None else (None,):
            found = locate_disc(win, self.predict, self.scale, self.size, stream=stream,
                                prior=prior, logits=True)
            bx0, by0, bx1, by1 = found.box
            box = (bx0 + x0, by0 + y0, bx1 + x0, by1 + y0)
            if found.how != "fallback-none" and prior is not None and found.diameter \
                    and info["score"] >= self.options.threshold:
                # Two independent measures of one disc: the model's (which shrinks with a
                # blurred disc) and the sure localiser's; their geometric mean sizes the box.
                d = math.sqrt(found.diameter * prior[2])
                box = square_box(found.centre[0] + x0, found.centre[1] + y0,
                                 d / self.scale.diameter)
            n += found.n_forward
            if found.how == "fallback-none":  # nothing found: nothing to check
                check = (0.0, None, None)
                continue
            check = self._check(a, box)
            n += 1
            if check[0] >= _min_confidence():
                break  # the stream's box shows a plausible disc: no per-image search
        return box, found, check, n

    def _check(self, a: np.ndarray, box):
        """The source model on the box: (plausibility, dominant blob, probabilities)."""
        from grata.scale_search import dominant_blob, plausibility, recrop
        p = probs_from_logits(np.asarray(self.predict(recrop(a, box, self.size))))
        p = p.reshape(p.shape[-3:])
        blob = dominant_blob(p[0])
        return plausibility(blob, self.size, self.scale), blob, p

    def _observe(self, check, box, fov_d: float) -> None:
        """The disc measured on the final box moves the stream (FOV units) when plausible
        and uncut."""
        _, blob, _ = check
        if blob is None or blob.cut or blob.share < 0.8:
            return
        self.stream.update(blob.d * (box[3] - box[1]) / self.size / fov_d)

    def _known(self, a: np.ndarray, known: dict) -> tuple[np.ndarray, Placement]:
        """A known disc: the box that gives it the model's diameter, centred on it."""
        from grata.scale_search import recrop, square_box
        d = 2 * float(known.get("ry", known.get("r", math.nan)))
        box = square_box(float(known["cx"]), float(known["cy"]), d / self.scale.diameter)
        info = {"cx": float(known["cx"]), "cy": float(known["cy"]), "r": d / 2, "score": 1.0,
                "fov": {k: float(known["fov"][k]) for k in ("cx", "cy", "d")},
                "reason": "known disc"}
        record = dict(roi.record(info, box), second_opinion=False,
                      scale={"how": "known", "factor": round(_roi_side(info) / (box[3] - box[1]),
                                                             4),
                             "confidence": 1.0, "n_forward": 0, "reason": "", "window": None})
        return recrop(a, box, self.size), Placement(a.shape[:2], box, record, a, RECORD_KEY)


def _min_confidence() -> float:
    from grata.scale_search import MIN_CONFIDENCE
    return MIN_CONFIDENCE


def _roi_side(info: dict) -> float:
    """The benchmark's ROI side (`grata.roi.roi_box`) of a localisation, pixels."""
    return max(1, int(round(roi.ROI_FRACTION * float(info["fov"]["d"]))))


def _both(info: dict, threshold: float, found, conf: float) -> str:
    """The one line of a refusal: the localiser's reason and the model's."""
    loc = info.get("reason") or "no disc-like region"
    model = found.reason if found.how == "fallback-none" and found.reason else \
        f"no plausible disc at its scale (plausibility {conf:.2f})"
    return (f"optic disc not found: localiser score {info['score']:.2f} < {threshold:.2f} "
            f"({loc}); the model's second opinion in the candidate window: {model}")


__all__ = ["RECORD_KEY", "WINDOW", "WINDOW_FOV", "PhotoScaleLocator"]

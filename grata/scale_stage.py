"""The disc-scale stage of the per-image pipeline: a crop of any scale re-cropped so the
disc has the model's training size (`ScaleLocator`, a `grata.placement.Locator`).

Per image, label-free, `grata.scale_search.locate_disc` asks the source model where the
disc is and how large; the model's input is that box cut from the crop as given
(`grata.scale_search.recrop`) and the prediction is pasted back into the crop's frame
(`grata.placement.Placement.paste`), so every metric stays there. A box other than the
whole crop is checked with a source pass on it (the locator's own, on a settled stream:
one pass in all): the crop as given is kept when its prediction shows the more plausible
disc (`grata.scale_search.prefer_scaled`), and the disc measured on the box feeds the
stream's running estimate (`grata.scale_search.StreamScale`, forgotten at `reset`), as
benchmarks/disc_scale.py measures it. A crop is never skipped for scale: where
no disc is found the input is the crop as given and the record says why.

The stage runs only for a model whose scale is known (`grata.disc_scale.model_scale`);
without one the caller prints model_scale's line and segments the crops as given.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from grata.disc_scale import DiscScale
from grata.gate import source_logits
from grata.metrics import probs_from_logits
from grata.placement import Placement

RECORD_KEY = "scale"  # the decision's key in report rows and serve records


class ScaleLocator:
    """The locate step for crops of any scale (`grata.placement.Locator`).

    `predict(x)` takes the model's input float32 [3, S, S] in [0, 1] and returns the
    source model's logits ([2, S, S] or [1, 2, S, S]; `source_predict` makes it from an
    engine). `scale` is the model's disc scale, `size` its input side S, `stream` a
    `grata.scale_search.StreamScale` to continue (default: a new one)."""

    def __init__(self, size: int, scale: DiscScale, predict: Callable[[np.ndarray], np.ndarray],
                 stream=None):
        from grata.scale_search import StreamScale  # scipy: grata --help starts without it
        self.size, self.scale, self.predict = size, scale, predict
        self.stream = stream if stream is not None else StreamScale()

    def locate(self, picture: np.ndarray, name: str = "image") -> tuple[np.ndarray, Placement]:
        """A crop as given (uint8 [H, W, 3]) -> (the model's input float32 [3, S, S], the
        Placement of its box with the scale decision as record). Never raises for what
        the crop holds: a crop without a disc is the crop as given, the reason recorded."""
        from grata.scale_search import locate_disc, prefer_scaled, recrop
        a = np.asarray(picture)
        H, W = a.shape[:2]
        found = locate_disc(a, self.predict, self.scale, self.size, stream=self.stream,
                            logits=True)
        box, how, reason, n = found.box, found.how, found.reason, found.n_forward
        if found.identity:
            crop_pred = found.as_given  # predicted already (None for a flat image)
        else:
            if found.on_box is not None:  # the locator's own pass on the box checked it
                crop_pred = found.on_box
            elif found.seen_at_scale:  # the disc was seen at the model's scale: no check
                crop_pred = None
            else:
                crop_pred, n = self._check(a, box), n + 1
            if crop_pred is not None and found.how == "stream" and \
                    not prefer_scaled(found, crop_pred, self.scale):
                # The stream's scale did not fit this image (the camera changed?): its own
                # search, whose estimate lets the stream switch within a few images
                # instead of waiting for crops that happen to fit as given.
                own = locate_disc(a, self.predict, self.scale, self.size, logits=True)
                n += own.n_forward
                if own.identity:
                    found, crop_pred = own, own.as_given
                    box, how = found.box, found.how
                    reason = own.reason or "the stream's scale did not fit"
                else:
                    own_pred, n = self._check(a, own.box), n + 1
                    if prefer_scaled(own, own_pred, self.scale):
                        found, crop_pred, box = own, own_pred, own.box
                        how, reason = own.how, "the stream's scale did not fit"
            if box != found.box or (crop_pred is not None
                                    and not prefer_scaled(found, crop_pred, self.scale)):
                box, how = (0, 0, W, H), "fallback-none"
                reason = "kept as given: the box showed a less plausible disc"
        # Only a plausible, uncut disc on the final box moves the stream.
        self.stream.observe(found, crop_pred if box == found.box else None)
        record = {"box": list(box), "factor": round(H / (box[3] - box[1]), 4), "how": how,
                  "n_forward": n, "reason": reason, "confidence": round(found.confidence, 4)}
        placement = Placement((H, W), tuple(box), record, a, RECORD_KEY)
        return recrop(a, box, self.size), placement

    def _check(self, a: np.ndarray, box) -> np.ndarray:
        """The source model's probabilities [2, S, S] on `box`: the check that the box did
        not miss a disc the crop as given showed, and the stream's measurement (as
        benchmarks/disc_scale.py)."""
        from grata.scale_search import recrop
        p = probs_from_logits(np.asarray(self.predict(recrop(a, box, self.size))))
        return p.reshape(p.shape[-3:])

    def reset(self) -> None:
        """A new stream: the running scale estimate forgotten."""
        self.stream.reset()

    def stream_state(self) -> dict:
        """The running estimate, JSON-safe (a serve state's ``scale_stream``)."""
        return self.stream.state()

    def load_stream(self, state: dict) -> None:
        """Continue the running estimate `stream_state` saved (a malformed one is a
        GrataError line)."""
        from grata.scale_search import StreamScale  # scipy: see __init__
        self.stream = StreamScale.from_state(state)


def source_predict(engine) -> Callable[[np.ndarray], np.ndarray]:
    """The source model's logits (theta0, stored statistics) of a model input through
    `engine`, on the host: the locator's `predict`."""
    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(engine.to_numpy(source_logits(engine, engine.to_input(x))))
    return predict


__all__ = ["RECORD_KEY", "ScaleLocator", "source_predict"]

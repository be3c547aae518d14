"""The disc-scale stage of the per-image pipeline: a crop of any scale re-cropped so the
disc has the model's training size (`ScaleLocator`, a `grata.placement.Locator`).

Per image, label-free, `grata.scale_search.locate_disc` asks the source model where the
disc is and how large; the model's input is that box cut from the crop as given
(`grata.scale_search.recrop`) and the prediction is pasted back into the crop's frame
(`grata.placement.Placement.paste`), so every metric stays there. One running estimate per
stream (`grata.scale_search.StreamScale`), forgotten at `reset`. A crop is never skipped
for scale: where no disc is found the input is the crop as given and the record says why.

The stage runs only for a model whose scale is known (`grata.disc_scale.model_scale`);
without one the caller prints model_scale's line and segments the crops as given.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from grata.disc_scale import DiscScale
from grata.gate import source_logits
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
        from grata.scale_search import locate_disc, recrop
        a = np.asarray(picture)
        found = locate_disc(a, self.predict, self.scale, self.size, stream=self.stream,
                            logits=True)
        # Only a plausible per-image measurement moves the stream (StreamScale.observe).
        self.stream.observe(found)
        record = {"box": list(found.box), "factor": round(found.factor, 4), "how": found.how,
                  "n_forward": found.n_forward, "reason": found.reason,
                  "confidence": round(found.confidence, 4)}
        placement = Placement(tuple(a.shape[:2]), tuple(found.box), record, a, RECORD_KEY)
        return recrop(a, found.box, self.size), placement

    def reset(self) -> None:
        """A new stream: the running scale estimate forgotten."""
        self.stream.reset()


def source_predict(engine) -> Callable[[np.ndarray], np.ndarray]:
    """The source model's logits (theta0, stored statistics) of a model input through
    `engine`, on the host: the locator's `predict`."""
    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(engine.to_numpy(source_logits(engine, engine.to_input(x))))
    return predict


__all__ = ["RECORD_KEY", "ScaleLocator", "source_predict"]

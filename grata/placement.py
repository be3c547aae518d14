"""Where the model's input sits in the picture as given: the seam of the locate and
paste-back steps of the per-image pipeline (`grata.pipeline`).

A `Locator` turns a picture (uint8 [H, W, 3], as the camera gave it) into the model's
input (float32 [3, S, S]) and a `Placement`: the box of the picture the input shows, the
picture's shape, and what the locator decided (its ``record``, carried into report rows
and serve records). After the prediction, `Placement.paste` puts the [2, S, S] prediction
back into a mask of the picture's size. `reset()` starts a new stream (a locator that
keeps a running estimate forgets it there; the pipeline's `reset` calls it with the
method's). The load step that hands the locator its picture is `grata.picture`.

Implementations: `grata.photo.RoiLocator` (whole photographs: the disc found, the
benchmark's ROI cut) and `grata.scale_stage.ScaleLocator` (crops of any scale: the box
that gives the disc the model's training size; its record says box, factor and how),
`grata.photo_scale.PhotoScaleLocator` (whole photographs at the model's disc scale);
without a locator the picture is a crop and the input is the whole picture resized
(`Placement.whole`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from grata import metrics, roi


@dataclass(frozen=True)
class Placement:
    """The model's input within the picture: ``box`` (x0, y0, x1, y1) in the picture's
    pixels (it may leave the picture), ``shape`` (H, W) of the picture as given,
    ``record`` what the locate step decided (None: no locate step, the whole picture),
    ``pixels`` the picture itself when a locate step kept it (overlays) and ``key`` the
    record's name in report rows and serve records (``roi``, ``scale``)."""

    shape: tuple[int, int]
    box: tuple[int, int, int, int]
    record: dict | None = None
    pixels: Any = None
    key: str = "roi"

    @classmethod
    def whole(cls, shape) -> Placement:
        """The whole picture of `shape` (H, W), resized to the model's input."""
        H, W = int(shape[0]), int(shape[1])
        return cls((H, W), (0, 0, W, H))

    @property
    def located(self) -> bool:
        """Whether a locate step chose the box (else it is the whole picture)."""
        return self.record is not None

    def paste(self, pred) -> np.ndarray:
        """A [2, S, S] prediction (bool or probabilities, threshold 0.5) -> bool [2, H, W]
        of the picture's size: each channel resized to the box by nearest neighbour and
        placed there, background elsewhere (the part of the box outside is dropped)."""
        p = metrics.binarize(pred)
        if p.ndim != 3 or p.shape[0] != 2:
            raise ValueError(f"expected a [2, S, S] prediction, got shape {p.shape}")
        return np.stack([roi.paste(c.astype(np.uint8), self.box, self.shape, background=0) > 0
                         for c in p])

    def fields(self) -> dict:
        """What the locate step decided, for a report row or a serve record."""
        return {} if self.record is None else {self.key: self.record}


class Locator(Protocol):
    """The locate step: a picture as given -> (the model's input, its placement)."""

    def locate(self, picture: np.ndarray, name: str) -> tuple[np.ndarray, Placement]:
        """`picture` uint8 [H, W, 3] -> (float32 [3, S, S] in [0, 1], Placement). A picture
        that cannot be placed raises `grata.roi.RoiRejected` (its ``reason`` one line):
        never segmented blindly."""

    def reset(self) -> None:
        """Start a new stream (forget any running estimate)."""


__all__ = ["Locator", "Placement"]

"""Whole photographs through a crop model: locate the disc, paste the crop's prediction
back.

The locate step (`RoiLocator`, a `grata.placement.Locator`) gives the model the
benchmark's ROI resized to S x S (`grata.domains.photo_sample`); what a camera user gets, and
what is scored, is a mask of the photograph's own size with the prediction in the ROI box
and background elsewhere (`grata.placement.Placement.paste`). A wrong box therefore costs
Dice.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from grata import metrics, roi
from grata.domains import Photo, RoiOptions, photo_sample
from grata.masks import to_mask_png
from grata.placement import Placement


class RoiLocator:
    """The locate step of whole photographs (`grata.placement.Locator`): the disc found
    (`grata.roi`) or taken from ``options.discs``, the benchmark's ROI cut and resized to
    `size` as a crop file is read. Raises grata.roi.RoiRejected below
    ``options.threshold``. Nothing carries over from one photograph to the next."""

    def __init__(self, size: int, options: RoiOptions | None = None):
        self.size, self.options = size, options or RoiOptions()

    def locate(self, picture: np.ndarray, name: str = "photograph"
               ) -> tuple[np.ndarray, Placement]:
        a = np.asarray(picture)
        empty = np.zeros((2,) + a.shape[:2], bool)  # no truth here; photo_sample needs one
        sample = photo_sample(name, a, empty, self.size, self.options)
        return sample.image, placement_of(sample.photo)

    def reset(self) -> None:
        pass


def placement_of(photo: Photo) -> Placement:
    """Where a whole photograph's crop came from, as the pipeline's Placement."""
    return Placement(tuple(photo.shape[:2]), tuple(photo.box), photo.record, photo.pixels)


def paste_prediction(pred, box, shape) -> np.ndarray:
    """A [2, S, S] prediction (bool or probabilities, threshold 0.5) of the crop ``box``
    -> bool [2, H, W] for a photograph of ``shape`` (H, W, ...): each channel resized to
    the box by nearest neighbour, placed there, background elsewhere (the part of the box
    outside the photograph is dropped)."""
    return Placement(tuple(shape[:2]), tuple(box)).paste(pred)


def segment_photograph(photo: np.ndarray, predict_crop: Callable[[np.ndarray], np.ndarray],
                       size: int, threshold: float = roi.SCORE_THRESHOLD
                       ) -> tuple[np.ndarray, dict]:
    """Segment one whole photograph (uint8 [H, W, 3]) with a crop model.

    Localise the disc, cut the ROI, resize it to ``size`` (`RoiLocator`) and call
    ``predict_crop(x)`` with x float32 [3, size, size] in [0, 1]; it returns the
    [2, size, size] prediction (probabilities or bool). Returns the mask of the
    photograph's size in the file encoding (uint8: 255 background, 128 rim, 0 cup) and a
    JSON-safe record: ``box``, ``score``, disc centre/radius, FOV and ``vcdr`` (of the
    pasted-back mask; None without a disc). Raises grata.roi.RoiRejected (``.reason``)
    when the disc is not found with ``threshold`` confidence: never segmented blindly."""
    image, placement = RoiLocator(size, RoiOptions(threshold=threshold)).locate(photo)
    full = placement.paste(np.asarray(predict_crop(image)))
    vcdr = metrics.vertical_cdr(full)
    record = dict(placement.record, vcdr=None if np.isnan(vcdr) else round(float(vcdr), 4))
    return to_mask_png(full), record

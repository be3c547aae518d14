"""Whole photographs through a crop model: paste the crop's prediction back, score it.

The model sees the benchmark's ROI resized to S x S (`grata.domains.photo_sample`); what a
camera user gets, and what is scored, is a mask of the photograph's own size with the
prediction in the ROI box and background elsewhere. A wrong box therefore costs Dice.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from grata import metrics, roi
from grata.domains import RoiOptions, photo_sample
from grata.masks import to_mask_png


def paste_prediction(pred, box, shape) -> np.ndarray:
    """A [2, S, S] prediction (bool or probabilities, threshold 0.5) of the crop ``box``
    -> bool [2, H, W] for a photograph of ``shape`` (H, W, ...): each channel resized to
    the box by nearest neighbour, placed there, background elsewhere (the part of the box
    outside the photograph is dropped)."""
    p = metrics.binarize(pred)
    if p.ndim != 3 or p.shape[0] != 2:
        raise ValueError(f"expected a [2, S, S] prediction, got shape {p.shape}")
    return np.stack([roi.paste(c.astype(np.uint8), box, shape, background=0) > 0 for c in p])


def scored(pred: np.ndarray, sample) -> tuple[np.ndarray, np.ndarray, dict]:
    """(prediction, target, extra row fields) to score a sample by: the crop's own when
    the sample is a crop; for a whole photograph the pasted-back prediction against the
    full-size target, and the localisation record (box, score, ...) under ``roi``."""
    photo = getattr(sample, "photo", None)
    if photo is None:
        return pred, sample.target, {}
    return paste_prediction(pred, photo.box, photo.shape), photo.target, {"roi": photo.record}


def segment_photograph(photo: np.ndarray, predict_crop: Callable[[np.ndarray], np.ndarray],
                       size: int, threshold: float = roi.SCORE_THRESHOLD
                       ) -> tuple[np.ndarray, dict]:
    """Segment one whole photograph (uint8 [H, W, 3]) with a crop model.

    Localise the disc, cut the ROI, resize it to ``size`` (as the data reader does) and
    call ``predict_crop(x)`` with x float32 [3, size, size] in [0, 1]; it returns the
    [2, size, size] prediction (probabilities or bool). Returns the mask of the
    photograph's size in the file encoding (uint8: 255 background, 128 rim, 0 cup) and a
    JSON-safe record: ``box``, ``score``, disc centre/radius, FOV and ``vcdr`` (of the
    pasted-back mask; None without a disc). Raises grata.roi.RoiRejected (``.reason``)
    when the disc is not found with ``threshold`` confidence: never segmented blindly."""
    a = np.asarray(photo)
    empty = np.zeros((2,) + a.shape[:2], bool)  # no truth here; photo_sample needs a target
    sample = photo_sample("photograph", a, empty, size, RoiOptions(threshold=threshold))
    pred = np.asarray(predict_crop(sample.image))
    full = paste_prediction(pred, sample.photo.box, sample.photo.shape)
    vcdr = metrics.vertical_cdr(full)
    record = dict(sample.photo.record, vcdr=None if np.isnan(vcdr) else round(float(vcdr), 4))
    return to_mask_png(full), record

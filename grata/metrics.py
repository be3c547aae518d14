"""Segmentation metrics of the benchmark: Dice, surface distance, vertical cup-to-disc ratio.

Masks are arrays [2, H, W]: channel 0 = optic disc *including* the cup, channel 1 = cup.
Every function accepts bool masks or probabilities (foreground where p >= 0.5, as the
reference thresholds its sigmoid outputs); logits must go through `probs_from_logits`
first. Pure numpy; scipy is needed only by `surface_distance` and is imported there, so
Dice and vCDR work on an install without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

THRESHOLD = 0.5
# Smoothing term of the reference's Dice: it makes two empty masks score 100, not 0/0.
DICE_SMOOTH = 1e-6
# What the reference reports as surface distance when a mask is empty (medpy raises there).
EMPTY_SURFACE_DISTANCE = 100.0

OD, OC = 0, 1
IMAGE_KEYS = (
    "dice_od", "dice_oc", "dice_mean", "asd_od", "asd_oc", "vcdr_pred", "vcdr_gt", "vcdr_error",
)
DOMAIN_KEYS = ("n_images", "dice_od", "dice_oc", "dice_mean", "asd_od", "asd_oc", "vcdr_mae")


def probs_from_logits(logits) -> np.ndarray:
    """Sigmoid that never overflows: exp is only taken of -|x|.

    Float input keeps its dtype (float32 logits give the same probabilities, and so the
    same p >= 0.5 decisions, as the reference's float32 sigmoid); other input becomes float64.
    """
    x = np.asarray(logits)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def binarize(values, logits: bool = False) -> np.ndarray:
    """Bool mask: bool input unchanged, anything else foreground where value >= 0.5.

    0/1 or 0/255 integer masks therefore pass through correctly too; NaN is background.
    With ``logits``: foreground where the logit is >= 0 (sigmoid >= 0.5), decided on the
    sign in float32, as the engines compute, so no rounding of a sigmoid near 0.5 moves it.
    """
    if logits:
        return np.asarray(values, dtype=np.float32) >= 0
    a = np.asarray(values)
    if a.dtype == np.bool_:
        return a
    return a >= THRESHOLD


def _pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    p, g = binarize(pred), binarize(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from target shape {g.shape}")
    return p, g


def dice_ratio(pred, gt) -> float:
    """Dice of one channel in [0, 1]: (2|P∩G| + 1e-6) / (|P| + |G| + 1e-6) (float64); two
    empty masks agree (1)."""
    p, g = _pair(pred, gt)
    inter = float(np.count_nonzero(p & g))
    total = float(np.count_nonzero(p)) + float(np.count_nonzero(g))
    return (2.0 * inter + DICE_SMOOTH) / (total + DICE_SMOOTH)


def dice(pred, gt) -> float:
    """Dice of one channel in percent, as the benchmark reports it: `dice_ratio` * 100."""
    return dice_ratio(pred, gt) * 100.0


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    # Connectivity 1 (4-neighbourhood in 2-D) and a background border are medpy's defaults:
    # a mask touching the image edge has that edge as part of its surface.
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def surface_distance(pred, gt, spacing=1.0) -> float:
    """One-sided average surface distance from `pred` to `gt`, in units of `spacing`.

    Matches medpy's `metric.binary.asd(result=pred, reference=gt, voxelspacing=spacing)`
    with its default connectivity 1: the surface of a mask is the mask XOR its binary erosion
    by the cross-shaped structure (pixels outside the image count as background); every
    surface pixel of `pred` contributes its Euclidean distance to the nearest surface pixel
    of `gt` (distance transform of the complement of gt's surface); the result is the mean.
    It is not symmetric. Where either mask is empty medpy raises; the reference then reports
    100, and so does this function (also when both are empty).
    `spacing` is a scalar or one value per axis (row, column).
    """
    from scipy import ndimage

    p, g = _pair(pred, gt)
    if not p.any() or not g.any():
        return EMPTY_SURFACE_DISTANCE
    dist_to_gt_surface = ndimage.distance_transform_edt(~_surface(g), sampling=spacing)
    return float(dist_to_gt_surface[_surface(p)].mean())


def vertical_diameter(mask) -> int:
    """Vertical diameter in pixels, as the REFUGE challenge measures it: the largest number
    of foreground pixels in any one column.

    Chosen over the row extent (top-most to bottom-most foreground row) because it is the
    challenge's definition and because a stray speck above or below the disc cannot stretch
    it; for a solid, convex structure the two agree.
    """
    m = binarize(mask)
    if m.ndim != 2:
        raise ValueError(f"expected one [H, W] mask, got shape {m.shape}")
    if m.size == 0:
        return 0
    return int(m.sum(axis=0).max())


def vertical_cdr(mask2ch) -> float:
    """Vertical cup-to-disc ratio of a [2, H, W] mask: cup diameter / disc diameter.

    NaN when the disc (channel 0) is empty: there is no ratio to read. Not clipped to 1:
    a predicted cup taller than the predicted disc is reported as such.
    """
    m = binarize(mask2ch)
    if m.ndim != 3 or m.shape[0] != 2:
        raise ValueError(f"expected a [2, H, W] mask, got shape {m.shape}")
    disc = vertical_diameter(m[OD])
    if disc == 0:
        return math.nan
    return vertical_diameter(m[OC]) / disc


def vcdr_error(pred, gt) -> float:
    """Absolute vCDR error |vCDR(pred) - vCDR(gt)| of [2, H, W] masks.

    NaN when the target has no disc (nothing to compare with). When the prediction has no
    disc but the target has one, the predicted vCDR counts as 0, so the error is vCDR(gt):
    a missed disc is penalised instead of silently dropping out of the mean error.
    """
    p, g = _pair(pred, gt)
    v_gt = vertical_cdr(g)
    if math.isnan(v_gt):
        return math.nan
    v_pred = vertical_cdr(p)
    if math.isnan(v_pred):
        v_pred = 0.0
    return abs(v_pred - v_gt)


def image_metrics(pred, gt, spacing=1.0) -> dict[str, float]:
    """All per-image metrics of [2, H, W] masks, as plain floats.

    Keys: dice_od, dice_oc, dice_mean ((OD+OC)/2), asd_od, asd_oc (pred -> gt, 100 where a
    mask is empty), vcdr_pred, vcdr_gt (NaN where that mask has no disc), vcdr_error (NaN
    only where the target has no disc; see `vcdr_error` for a missing predicted disc).
    """
    p, g = _pair(pred, gt)
    if p.ndim != 3 or p.shape[0] != 2:
        raise ValueError(f"expected [2, H, W] masks, got shape {p.shape}")
    d_od, d_oc = dice(p[OD], g[OD]), dice(p[OC], g[OC])
    return {
        "dice_od": d_od,
        "dice_oc": d_oc,
        "dice_mean": (d_od + d_oc) / 2.0,
        "asd_od": surface_distance(p[OD], g[OD], spacing),
        "asd_oc": surface_distance(p[OC], g[OC], spacing),
        "vcdr_pred": vertical_cdr(p),
        "vcdr_gt": vertical_cdr(g),
        "vcdr_error": vcdr_error(p, g),
    }


def _column(rows: list[Mapping], key: str) -> np.ndarray:
    # None stands for NaN: rows that went through strict JSON come back that way.
    return np.array([math.nan if r[key] is None else float(r[key]) for r in rows], np.float64)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def aggregate(rows: Iterable[Mapping]) -> dict[str, float | int]:
    """Per-domain summary of `image_metrics` rows.

    Dice and surface distances are plain means over the images (as the reference: per-image
    Dice averaged over the domain), dice_mean = (dice_od + dice_oc) / 2. vcdr_mae is the mean
    of vcdr_error over the images whose target has a disc (NaN rows skipped); NaN if none.
    An empty list gives n_images 0 and NaN everywhere else.
    """
    rows = list(rows)
    out: dict[str, float | int] = {"n_images": len(rows)}
    for key in ("dice_od", "dice_oc"):
        out[key] = _mean(_column(rows, key))
    out["dice_mean"] = (out["dice_od"] + out["dice_oc"]) / 2.0
    for key in ("asd_od", "asd_oc"):
        out[key] = _mean(_column(rows, key))
    err = _column(rows, "vcdr_error")
    out["vcdr_mae"] = _mean(err[~np.isnan(err)])
    return out

"""Mask conventions: what the grey levels of a stored mask mean, and the file encoding of
a prediction. Pure numpy; the readers (`grata.decode`) turn a ValueError here into a
DataError naming the file.

- the specification's encoding (see the specification, "Data conventions"): 8-bit grey,
  255 background, 0 cup, one level in between (128) rim; channel 0 of a target = disc
  including cup (value < 255), channel 1 = cup (value == 0).
- conventions (`mask_convention`, decided on the full-size mask before resizing):
  ``spec`` 255 / 0 / one level in between; ``spec-noisy`` the same with JPEG noise: at
  least 99 % of the pixels within 24 grey levels of 0, 128 or 255, read by the nearest of
  the three; ``labels`` 0/1/2 = background/rim/cup (a label map). Two-level masks (0/1,
  0/255, either polarity) label one structure only: the cup is missing, and scoring them as
  disc+cup would put a cup Dice of about 0 into the domain mean, so they are refused with a
  reason naming the convention, as is anything else (noise, many grey levels, no
  background).
- 16-bit masks (`wide_grey`) are accepted in two unambiguous forms: values that fit 0..255
  (8-bit labels stored in a 16-bit file) mean what they mean in 8 bits; a mask that uses
  the full range (maximum 65535) reads 65535 as background, 0 as cup, anything between as
  rim. Any other 16-bit mask is refused.
"""

from __future__ import annotations

import numpy as np

from grata import metrics

MASK_TOLERANCE = 24      # grey levels of JPEG noise accepted around 0, 128 and 255
MASK_STRAY = 0.01        # at most this fraction of mask pixels farther from a level


def wide_grey(values) -> np.ndarray:
    """A mask stored with more than 8 bits per pixel -> uint8 grey in the 8-bit meaning
    (see the module docstring); ValueError (one line) for any other 16-bit mask."""
    v = np.asarray(values)
    top = float(v.max()) if v.size else 0.0
    if float(v.min()) < 0 or not np.isfinite(top):
        raise ValueError("mask has negative or non-finite values")
    if top <= 255:
        return v.astype(np.uint8)
    if top == 65535:
        out = np.full(v.shape, 128, np.uint8)
        out[v == 65535] = 255
        out[v == 0] = 0
        return out
    raise ValueError(f"16-bit mask with values up to {top:g}: expected 8-bit values "
                     "(0..255) or the full 16-bit range with 65535 as background")


def _levels(h: np.ndarray) -> str:
    shown = [str(v) for v in np.flatnonzero(h)[:6]]
    return "/".join(shown) + ("/..." if np.count_nonzero(h) > 6 else "")


def mask_convention(grey) -> str:
    """The convention of a full-size 8-bit grey mask (uint8 array): ``spec`` (255
    background, 0 cup, one level in between rim), ``spec-noisy`` (the same with JPEG-like
    noise, see the module docstring) or ``labels`` (0/1/2 = background/rim/cup). A mask
    that follows none of them, labels one structure only or has no background raises
    ValueError with the reason (one line)."""
    v = np.asarray(grey)
    h = np.bincount(v.ravel(), minlength=256)[:256]
    present = set(np.flatnonzero(h).tolist())
    if present and present <= {0, 1, 2} and 2 in present:
        if 0 not in present:
            raise ValueError(f"label mask (values {_levels(h)}) has no background (0)")
        return "labels"
    if present in ({0, 1}, {0, 255}):
        raise ValueError(f"mask has one structure only (values {_levels(h)}): the cup is "
                         f"not labelled, so disc and cup cannot both be scored")
    if 255 in present and len(present - {0, 255}) <= 1:
        return "spec"
    t = MASK_TOLERANCE
    near = np.zeros(256, bool)
    near[: t + 1] = near[128 - t: 128 + t + 1] = near[255 - t:] = True
    stray = float(h[~near].sum()) / max(1, v.size)
    bg, rim, cup = int(h[192:].sum()), int(h[65:192].sum()), int(h[:65].sum())
    if stray > MASK_STRAY:
        raise ValueError(f"mask values follow no known convention ({len(present)} grey "
                         f"levels, {stray:.0%} of the pixels not within {t} of 0, 128 or "
                         f"255)")
    if bg == 0:
        raise ValueError(f"mask has no background (255; values {_levels(h)})")
    if cup and rim < 0.01 * (rim + cup):
        raise ValueError("mask has one structure only (values near 0 and 255, no rim): "
                         "the cup is not labelled, so disc and cup cannot both be scored")
    return "spec-noisy"


def spec_levels(grey) -> np.ndarray:
    """A full-size 8-bit grey mask in the specification's 255/128/0 encoding, whatever
    recognised convention it was stored in (anything else: ValueError with the reason)."""
    grey = np.asarray(grey)
    convention = mask_convention(grey)
    if convention == "spec":
        return grey
    out = np.full(grey.shape, 128, np.uint8)
    if convention == "labels":
        out[grey == 0] = 255
        out[grey == 2] = 0
    else:  # spec-noisy: nearest of 0, 128, 255 (boundaries halfway)
        out[grey >= 192] = 255
        out[grey <= 64] = 0
    return out


def target(levels) -> np.ndarray:
    """A mask in the 255/128/0 encoding -> bool [2, H, W]: disc (incl. cup), cup."""
    v = np.asarray(levels)
    return np.stack([v < 255, v == 0])


def to_mask_png(pred) -> np.ndarray:
    """Prediction [2, H, W] (bool or probabilities, threshold 0.5) -> uint8 [H, W] mask
    in the file encoding: 255 background, 128 rim, 0 cup (a cup pixel outside the disc
    is still cup, so the reader reads it back as disc and cup)."""
    p = metrics.binarize(pred)
    if p.ndim != 3 or p.shape[0] != 2:
        raise ValueError(f"expected a [2, H, W] prediction, got shape {p.shape}")
    disc, cup = p[0], p[1]
    out = np.full(p.shape[1:], 255, np.uint8)
    out[disc] = 128
    out[cup] = 0
    return out

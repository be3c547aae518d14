"""Whole fundus photographs: find the optic disc, cut the benchmark's ROI, paste back.

Coordinates are continuous pixel coordinates of the given image: pixel column ``j``
spans ``[j, j + 1)``, so its centre is ``j + 0.5``; a box ``(x0, y0, x1, y1)`` holds
columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1`` and may leave the photograph.

The ROI rule (the benchmark's crops): a square centred on the disc whose side is
:data:`ROI_FRACTION` of the field-of-view diameter. GraTa/DoFE crop 800 px from
photographs about 2124 px wide whose circular field of view spans their width, so
``ROI_FRACTION = 800 / 2124``. The FOV diameter is the larger extent of the FOV mask
(its width when the circle is cut at the top and bottom). Where the square leaves the
photograph, the crop is padded with black (masks with background, 255).

Localisation (:func:`locate_disc`), classical and offline (numpy/scipy/Pillow):

1. field of view: the brightest channel, box-reduced to a thumbnail, thresholded
   between the black surround and the retina; largest component; its diameter is
   the larger side of its box, or the circle through its free edge when the frame
   cuts it on more than two sides;
2. the FOV is resampled so its diameter is :data:`WORK_D` pixels (the search cost does not
   depend on the camera's resolution beyond one box reduction); an eroded FOV mask
   keeps rim artefacts out;
3. illumination: luminance and green are divided by a large-scale background
   (masked normalised convolution of the image clipped at its 90th percentile, so the
   disc does not raise its own background);
4. brightness cue: multi-scale centre-surround contrast of a disc-sized blob;
5. vessel cue: black top-hat of the normalised green (thin dark vessels) above a
   noise floor (twice its median in the FOV), weighted
   toward vertical vessels (the arcades leave the disc up and down), averaged over a
   tall window of a disc's size: vessels converge, and are thickest, at the disc;
6. vote: the candidates are the brightness peaks; each is scored by its contrast and
   its vessel enrichment (vessel density at the candidate / mean density in the FOV);
   the best product wins; ``score`` (0-1) is the product of the two cues'
   confidences (logistic in the contrast and in the enrichment) and a prominence term
   (best against second-best candidate), so a bright blob without converging vessels
   (a reflection, a lesion) or vessels without a bright disc (a macula photograph
   whose disc is out of the field) scores low;
7. the centre and radius are refined from the bright component around the peak.

:data:`SCORE_THRESHOLD` is the default below which :func:`prepare` rejects.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from grata.errors import GrataError

ROI_FRACTION = 800 / 2124
WORK_D = 320           # FOV diameter (px) at which the disc is searched for
SCORE_THRESHOLD = 0.5  # prepare() rejects photographs scoring below this
_COARSE = 4            # the smooth cues' grid is this much coarser than the work grid
_FLOOR = 2.0  # vessel top-hat floor, in multiples of its median in the FOV
_FRAC = 0.3  # share of the core-to-surround step that bounds the disc
_THUMB = 160           # long side of the thumbnail the FOV is found on
_RADII = (0.04, 0.055, 0.075, 0.1)  # disc radius candidates, fraction of the FOV diameter


class RoiRejected(GrataError):
    """No disc was found with enough confidence; ``reason`` says why, ``info`` has the
    localisation result."""

    def __init__(self, reason: str, info: dict):
        self.reason = reason
        self.info = info
        super().__init__(f"optic disc not found: {reason}")


# ----------------------------------------------------------------------------- helpers

def _check(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or min(a.shape[:2]) < 16:
        raise GrataError(f"expected an H x W x 3 uint8 RGB photograph (at least 16 px), got "
                         f"shape {a.shape} {a.dtype}")
    return a


def _largest(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(sizes.argmax())


def _fov_threshold(chan: np.ndarray) -> tuple[float, float, float]:
    """(threshold, black level, retina level) of the brightest-channel thumbnail."""
    lo = float(np.percentile(chan, 1))
    hi = float(np.percentile(chan, 80))
    return max(lo + 0.12 * (hi - lo), lo + 3.0), lo, hi


def _block_mean(x: np.ndarray) -> np.ndarray:
    """Mean over _COARSE x _COARSE blocks (the ragged right/bottom edge is dropped)."""
    h, w = x.shape[0] // _COARSE, x.shape[1] // _COARSE
    return x[:h * _COARSE, :w * _COARSE].reshape(h, _COARSE, w, _COARSE).mean(axis=(1, 3))


def _normconv(x: np.ndarray, m: np.ndarray, sigma, msum=None) -> np.ndarray:
    """Gaussian mean of x over the mask m only (outside pixels do not darken it)."""
    from scipy import ndimage
    num = ndimage.gaussian_filter(x * m, sigma, mode="constant", truncate=3.0)
    den = msum if msum is not None else ndimage.gaussian_filter(m, sigma, mode="constant",
                                                                truncate=3.0)
    return num / np.maximum(den, 1e-3)


def _fail(reason: str, fov=None) -> dict:
    return {"cx": float("nan"), "cy": float("nan"), "r": float("nan"), "score": 0.0,
            "fov": fov, "reason": reason}


# ----------------------------------------------------------------------------- localisation

def find_fov(image) -> dict | None:
    """The field of view: ``{"cx", "cy", "d"}`` (centre and diameter, pixels of the
    image), or None when the photograph has no bright region."""
    a = _check(image)
    H, W = a.shape[:2]
    k = max(1, int(np.ceil(max(H, W) / _THUMB)))
    thumb = np.asarray(Image.fromarray(a).reduce(k), np.float32).max(axis=2)
    t, lo, hi = _fov_threshold(thumb)
    if hi - lo < 6:
        return None
    m = _largest(thumb > t)
    if m.sum() < 0.05 * m.size:
        return None
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    x0, x1 = cols[0] * k, min((cols[-1] + 1) * k, W)
    y0, y1 = rows[0] * k, min((rows[-1] + 1) * k, H)
    fov = {"cx": (x0 + x1) / 2, "cy": (y0 + y1) / 2, "d": max(x1 - x0, y1 - y0),
           "threshold": t}
    circle = _fit_circle(m)
    # A field of view cut by the frame on more than two sides is wider than the mask:
    # the circle through its free edge says how wide. Trust it only when the edge is a
    # circle and it is not smaller than the mask.
    if circle is not None and 2 * circle[2] * k > fov["d"] * 1.01:
        fov.update(cx=(circle[0] + 0.5) * k, cy=(circle[1] + 0.5) * k, d=2 * circle[2] * k)
    return fov


def _fit_circle(m: np.ndarray):
    """Least-squares circle (cx, cy, r in mask pixels, centres at integers) through the
    mask's edge pixels away from the frame; None when too few or not a circle."""
    from scipy import ndimage
    edge = m & ~ndimage.binary_erosion(m)
    edge[[0, -1], :] = False
    edge[:, [0, -1]] = False
    ys, xs = np.nonzero(edge)
    if len(xs) < 20:
        return None
    x, y = xs.astype(np.float64), ys.astype(np.float64)
    A = np.stack([x, y, np.ones_like(x)], axis=1)
    sol, *_ = np.linalg.lstsq(A, x * x + y * y, rcond=None)
    cx, cy = sol[0] / 2, sol[1] / 2
    r2 = sol[2] + cx * cx + cy * cy
    if r2 <= 0:
        return None
    r = np.sqrt(r2)
    resid = np.abs(np.hypot(x - cx, y - cy) - r)
    # the arc must span enough angle for the radius to mean something
    ang = np.arctan2(y - cy, x - cx)
    if np.median(resid) > 0.02 * r + 0.5 or np.ptp(np.unwrap(np.sort(ang))) < 1.5:
        return None
    return cx, cy, r + 0.5  # edge pixel centres lie half a pixel inside the edge


def locate_disc(image) -> dict:
    """Find the optic disc in a whole fundus photograph (H x W x 3 uint8 RGB).

    Returns ``{"cx", "cy", "r", "score", "fov", "reason"}``: disc centre and radius in
    pixels of the image (continuous coordinates, see the module), ``score`` in [0, 1]
    (confidence), ``fov`` (``{"cx", "cy", "d"}`` or None) and ``reason`` (why the score
    is low, or ""). A photograph without a field of view or without a disc-like
    candidate gets score 0 and NaN coordinates."""
    from scipy import ndimage
    a = _check(image)
    H, W = a.shape[:2]
    # One integer box reduction first (cheap, reads every pixel once); everything else
    # runs on the reduced copy, whose FOV stays wider than WORK_D.
    k = max(1, int(max(H, W) // (2 * WORK_D)))
    pil = Image.fromarray(a)
    small = pil.reduce(k) if k > 1 else pil
    fov = find_fov(np.asarray(small))
    if fov is None:
        return _fail("no field of view (the photograph is dark or flat)")
    fx = fy = float(k)  # reduced -> given image (a partial last block is ignored)

    # Resample the FOV's bounding square so that its diameter is WORK_D pixels.
    half = fov["d"] / 2 * 1.02
    bx0, by0 = max(0.0, fov["cx"] - half), max(0.0, fov["cy"] - half)
    bx1, by1 = min(float(small.size[0]), fov["cx"] + half), min(float(small.size[1]),
                                                                 fov["cy"] + half)
    s = WORK_D / fov["d"]
    ow, oh = max(8, round((bx1 - bx0) * s)), max(8, round((by1 - by0) * s))
    work = np.asarray(small.resize((ow, oh), Image.BILINEAR, box=(bx0, by0, bx1, by1)),
                      np.float32)
    fov_out = {"cx": float(fov["cx"] * fx), "cy": float(fov["cy"] * fy),
               "d": float(fov["d"] * max(fx, fy))}
    bx0, by0, bx1, by1 = bx0 * fx, by0 * fy, bx1 * fx, by1 * fy
    sx, sy = (bx1 - bx0) / ow, (by1 - by0) / oh

    m = _largest(work.max(axis=2) > fov["threshold"]).astype(np.float32)
    # The smooth cues run on a grid _COARSE times coarser (large Gaussians are the cost).
    mc = _block_mean(m)
    # Eroded FOV: the rim (and the bright artefacts that hug it) never hosts a candidate.
    inner = ndimage.gaussian_filter(mc, 0.02 * WORK_D / _COARSE) > 0.98
    if inner.sum() < 0.05 * inner.size:
        return _fail("field of view too small", fov_out)

    R, G, B = work[..., 0], work[..., 1], work[..., 2]
    lum = 0.3 * R + 0.6 * G + 0.1 * B
    # Illumination: divide by a background that the disc itself does not raise.
    sig_bg = 0.07 * WORK_D / _COARSE
    msum_bg = ndimage.gaussian_filter(mc, sig_bg, mode="constant", truncate=3.0)
    inside, inside_c = m > 0.5, mc > 0.5
    norm = []
    for c in (lum, G):
        cc = _block_mean(c)
        cap = np.percentile(cc[inside_c], 90)
        bg = _normconv(np.minimum(cc, cap), mc, sig_bg, msum_bg)
        bg_f = np.asarray(Image.fromarray(np.maximum(bg, 1.0).astype(np.float32), "F").resize(
            (c.shape[1], c.shape[0]), Image.BILINEAR))
        norm.append(np.where(inside, c / bg_f, 1.0).astype(np.float32))
    nl, ng = norm
    nlc = _block_mean(nl)

    # Brightness: centre-surround contrast at the disc radius candidates.
    best = np.full(nlc.shape, -np.inf, np.float32)
    scale = np.zeros(nlc.shape, np.float32)
    for fr in _RADII:
        r = fr * WORK_D / _COARSE
        resp = _normconv(nlc, mc, r / 2) - _normconv(nlc, mc, 1.5 * r)
        better = resp > best
        best[better] = resp[better]
        scale[better] = r * _COARSE
    best[~inner] = -np.inf

    # Vessels: black top-hat of the normalised green, weighted toward vertical vessels.
    gs = ndimage.gaussian_filter(ng, 0.7)
    th = ndimage.grey_closing(gs, size=(7, 7)) - gs
    th = np.where(inside, th, 0.0)
    # Noise alone gives every pixel some top-hat; what stands above twice the typical
    # level (most pixels are not vessels) is vessel.
    th = np.maximum(th - _FLOOR * np.median(th[inside]), 0.0)
    gx = ndimage.sobel(gs, axis=1)
    gy = ndimage.sobel(gs, axis=0)
    jxx = ndimage.gaussian_filter(gx * gx, 2.0)
    jyy = ndimage.gaussian_filter(gy * gy, 2.0)
    vert = jxx / (jxx + jyy + 1e-6)
    rv = 0.065 * WORK_D / _COARSE
    dens = _normconv(_block_mean(th * (0.25 + vert)), mc, (1.5 * rv, 0.6 * rv))
    mean_dens = float(dens[inner].mean()) + 1e-3  # a vessel-free image has no enrichment

    # Candidates: local maxima of the brightness contrast.
    peaks = (best == ndimage.maximum_filter(best, size=int(0.1 * WORK_D / _COARSE) | 1)) \
        & inner & (best > 0)
    ys, xs = np.nonzero(peaks)
    if len(ys) == 0:
        return _fail("no bright disc-like region", fov_out)
    order = np.argsort(best[ys, xs])[::-1][:8]
    ys, xs = ys[order], xs[order]
    b = best[ys, xs]
    v = dens[ys, xs] / mean_dens
    s_b = _sigmoid((b - 0.12) / 0.03)
    s_v = _sigmoid((v - 2.0) / 0.4)
    vote = b * np.clip(v, 0.2, None)
    i = int(np.argmax(vote))
    second = float(np.sort(vote)[-2]) if len(vote) > 1 else 0.0
    prominence = _sigmoid((vote[i] / max(second, 1e-6) - 1.15) / 0.1) if second > 0 else 1.0
    score = float(s_b[i] * s_v[i] * (0.5 + 0.5 * prominence))

    py, px = int(ys[i]) * _COARSE + _COARSE // 2, int(xs[i]) * _COARSE + _COARSE // 2
    r0 = float(scale[ys[i], xs[i]])
    cx_w, cy_w, r_w = _refine(nl, px, py, r0)
    reason = ""
    if s_b[i] < 0.5:
        reason = f"no bright disc-like region (contrast {b[i]:.2f})"
    elif s_v[i] < 0.5:
        reason = f"no vessels converge on the brightest region (enrichment {v[i]:.2f})"
    elif prominence < 0.5:
        reason = "two disc-like regions compete"
    return {"cx": float(bx0 + cx_w * sx), "cy": float(by0 + cy_w * sy),
            "r": float(r_w * (sx + sy) / 2), "score": round(score, 4), "fov": fov_out,
            "reason": reason if score < SCORE_THRESHOLD else "",
            "cues": {"contrast": round(float(b[i]), 4), "vessels": round(float(v[i]), 4),
                     "prominence": round(float(prominence), 4)}}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def _refine(nl: np.ndarray, px: int, py: int, r0: float) -> tuple[float, float, float]:
    """Centre (continuous, working pixels) and radius of the bright component around
    the peak, thresholded at _FRAC of the way from its surround up to its core."""
    from scipy import ndimage
    h, w = nl.shape
    k = int(np.ceil(2.2 * r0))
    y0, y1, x0, x1 = max(0, py - k), min(h, py + k + 1), max(0, px - k), min(w, px + k + 1)
    win = ndimage.gaussian_filter(nl[y0:y1, x0:x1], 1.0)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    d2 = (xx - px) ** 2 + (yy - py) ** 2
    core = float(np.percentile(win[d2 <= (0.5 * r0) ** 2], 75))
    ring = float(np.median(win[(d2 >= (1.6 * r0) ** 2) & (d2 <= (2.2 * r0) ** 2)]))
    if not core > ring:
        return px + 0.5, py + 0.5, r0
    region = (win > ring + _FRAC * (core - ring)) & (d2 <= (1.8 * r0) ** 2)
    region = ndimage.binary_closing(region, iterations=2)
    lab, _ = ndimage.label(region)
    keep = lab == lab[py - y0, px - x0] if lab[py - y0, px - x0] else _largest(region)
    keep = ndimage.binary_fill_holes(keep)
    n = int(keep.sum())
    if n < 0.2 * np.pi * r0 * r0:
        return px + 0.5, py + 0.5, r0
    return (float(xx[keep].mean()) + 0.5, float(yy[keep].mean()) + 0.5,
            float(np.sqrt(n / np.pi)))


# ----------------------------------------------------------------------------- ROI rule

def roi_box(image_shape, disc: dict, fov: dict) -> tuple[int, int, int, int]:
    """The benchmark's ROI: a square of side ``round(ROI_FRACTION * fov["d"])`` centred
    on ``(disc["cx"], disc["cy"])``, as integer ``(x0, y0, x1, y1)``; it may leave the
    photograph (``image_shape`` is accepted for symmetry with :func:`paste`)."""
    side = max(1, int(round(ROI_FRACTION * float(fov["d"]))))
    x0 = int(np.floor(float(disc["cx"]) - side / 2 + 0.5))
    y0 = int(np.floor(float(disc["cy"]) - side / 2 + 0.5))
    return x0, y0, x0 + side, y0 + side


def crop(image: np.ndarray, box, fill=0) -> np.ndarray:
    """The box's pixels of an image ([H, W] or [H, W, C]); ``fill`` where the box leaves
    the image (black for photographs, 255 for masks)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise GrataError(f"empty crop box {tuple(box)}")
    a = np.asarray(image)
    out = np.full((y1 - y0, x1 - x0) + a.shape[2:], fill, a.dtype)
    H, W = a.shape[:2]
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = a[sy0:sy1, sx0:sx1]
    return out


def paste(mask_crop: np.ndarray, box, full_shape, background: int = 255) -> np.ndarray:
    """A mask of the photograph's size (``full_shape`` = (H, W, ...)): ``mask_crop``
    (uint8 [h, w], any size) resized to the box by nearest neighbour and placed there;
    ``background`` elsewhere and where the box leaves the photograph is dropped."""
    x0, y0, x1, y1 = (int(v) for v in box)
    m = np.asarray(mask_crop)
    if m.ndim != 2:
        raise GrataError(f"expected a [h, w] mask crop, got shape {m.shape}")
    if m.shape != (y1 - y0, x1 - x0):
        m = np.asarray(Image.fromarray(m.astype(np.uint8)).resize((x1 - x0, y1 - y0),
                                                                  Image.NEAREST))
    H, W = int(full_shape[0]), int(full_shape[1])
    out = np.full((H, W), background, np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0:sy1, sx0:sx1] = m[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
    return out


def prepare(image, threshold: float = SCORE_THRESHOLD):
    """Localise, then cut the ROI: ``(crop uint8 [s, s, 3], box, info)``, ``info`` being
    :func:`locate_disc`'s result. Raises :class:`RoiRejected` (with the reason) when the
    score is below ``threshold``: such a photograph is never segmented blindly."""
    a = _check(image)
    info = locate_disc(a)
    if not info["score"] >= threshold:
        reason = info.get("reason") or f"score {info['score']:.2f} < {threshold:.2f}"
        raise RoiRejected(reason, info)
    box = roi_box(a.shape, info, info["fov"])
    return crop(a, box), box, info


def record(info: dict, box=None) -> dict:
    """A JSON-safe summary of a localisation (and its box) for reports: rounded
    numbers, None for what was not found."""
    def num(v, nd=2):
        return None if v is None or not np.isfinite(v) else round(float(v), nd)

    fov = info.get("fov")
    out = {"cx": num(info["cx"]), "cy": num(info["cy"]), "r": num(info["r"]),
           "score": num(info["score"], 4), "reason": info.get("reason", ""),
           "fov": None if fov is None else {k: num(fov[k]) for k in ("cx", "cy", "d")}}
    if box is not None:
        out["box"] = [int(v) for v in box]
    return out

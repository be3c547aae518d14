"""Synthetic whole fundus photographs: the synthetic benchmark before the ROI crop.

Each photograph (``size`` x ``0.78 size`` pixels, 1024 x 800 by default, far smaller than
a camera's 2-12 MP so that generation stays fast) shows a circular field of view (FOV) on
black with a soft, darkening rim (in some photographs cut at the top and bottom, in some
small), a retina whose illumination falls off toward the rim, the optic disc and cup of
:mod:`grata.synth` (same colours and shapes), vessel arcades leaving the disc and bending
around a darker macula/fovea about 2.5 disc diameters temporal of the disc, and more
vessels toward the nasal side. Left and right eyes (mirror images: the disc is nasal, on
the right of a right eye's photograph), the disc's position and size vary. Some
photographs carry a bright reflection artefact near the FOV rim or strongly uneven
illumination. Each domain's camera (exposure, white balance, gamma, blur, noise, JPEG...)
is :mod:`grata.synth`'s, with the same domain table.

Scale: the disc's vertical diameter is the domain's disc fraction of the benchmark's ROI,
whose side is :data:`grata.roi.ROI_FRACTION` of the FOV diameter; so the ROI rule of
:mod:`grata.roi` applied at the true disc gives crops like those of :mod:`grata.synth`.

Masks are full size (255 background, 128 rim, 0 cup). ``synth.json`` records per image the
true disc (centre, radii), the FOV (centre, diameter), the eye and the artefacts.
Determinism: one PCG64 generator per (seed, domain, split, index), as in grata.synth.
"""

from __future__ import annotations

import io
import json
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from grata import synth
from grata.roi import ROI_FRACTION
from grata.synth import (  # one scene and camera model
    camera,
    outline_radius,
    outline_wobble,
    sigmoid,
    write_image,
)

# The cameras of the crop benchmark. Its content targets (crop scale, position, border) are
# what the ROI rule itself produces from a whole photograph, so they have no whole version.
TARGET_DOMAINS = synth.CAMERA_DOMAINS

VERSION = 1
ASPECT = 0.78125  # height / width (1024 x 800)
_SALT = zlib.crc32(b"whole")
_GLARE = np.array([1.0, 0.95, 0.85], np.float32)


def _rng(seed: int, domain: str, split: str, index: int) -> np.random.Generator:
    key = [int(seed), zlib.crc32(domain.encode()), {"train": 0, "test": 1}[split],
           int(index), _SALT]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def _smooth(rng, h: int, w: int, cells: int) -> np.ndarray:
    """Zero-mean unit-std low-frequency noise of shape [h, w]."""
    from scipy import ndimage
    ch = max(2, round(cells * h / w))
    coarse = ndimage.gaussian_filter(rng.standard_normal((ch, cells)), 0.7, mode="wrap")
    up = np.asarray(Image.fromarray(coarse.astype(np.float32), "F").resize((w, h),
                                                                          Image.BICUBIC))
    return ((up - up.mean()) / (up.std() + 1e-6)).astype(np.float32)


def _draw_vessels(rng, w: int, h: int, disc, side: float, dd: float, fov):
    """Vein and artery opacity maps [h, w]: superior and inferior arcades bending
    around the macula, nasal vessels, small macular branches; random branching."""
    from scipy import ndimage
    canv = {"vein": Image.new("L", (w, h)), "artery": Image.new("L", (w, h))}
    draws = {n: ImageDraw.Draw(c) for n, c in canv.items()}
    temporal = np.pi if side > 0 else 0.0  # disc on the right: temporal is to the left
    nasal = np.pi - temporal
    step = dd / 8.0
    w_main = rng.uniform(0.05, 0.07) * dd
    fx, fy, fr = fov
    trunks = []
    for up in (-1.0, 1.0):
        for kind, wf in (("vein", 1.0), ("artery", 0.75)):
            hd = up * np.pi / 2 + rng.uniform(-0.25, 0.25) + (0.2 * up if side < 0 else 0)
            trunks.append((kind, hd, w_main * wf * rng.uniform(0.9, 1.1),
                           rng.uniform(0.05, 0.08), 400))
    for _ in range(rng.integers(3, 6)):
        trunks.append((("vein", "artery")[rng.integers(2)], nasal + rng.uniform(-1.2, 1.2),
                       w_main * rng.uniform(0.35, 0.6), 0.0, 200))
    for _ in range(rng.integers(2, 4)):
        trunks.append((("vein", "artery")[rng.integers(2)],
                       temporal + rng.uniform(-0.5, 0.5), w_main * rng.uniform(0.25, 0.4),
                       0.0, 14))
    stack = [(k, disc[0] + rng.normal(0, 0.05 * dd), disc[1] + rng.normal(0, 0.05 * dd),
              hd, wd, b, n, 0) for k, hd, wd, b, n in trunks]
    while stack:
        kind, x, y, hd, wd, bend, steps, depth = stack.pop()
        draw = draws[kind]
        for i in range(steps):
            if bend and i > 3:  # arcades turn toward the temporal side, around the macula
                hd += bend * np.sin(temporal - hd)
            hd += rng.normal(0, 0.06)
            nx, ny = x + step * np.cos(hd), y + step * np.sin(hd)
            fill = int((255 if kind == "vein" else 215) * min(1.0, 0.35 + wd / w_main))
            draw.line([(x, y), (nx, ny)], fill=fill, width=max(1, round(wd)))
            x, y, wd = nx, ny, wd * 0.995
            if (x - fx) ** 2 + (y - fy) ** 2 > fr * fr:
                break
            if depth < 2 and i > 3 and wd > 1.0 and rng.random() < 0.04:
                stack.append((kind, x, y, hd + rng.choice([-1, 1]) * rng.uniform(0.4, 0.9),
                              wd * rng.uniform(0.5, 0.75), 0.0, int(steps * 0.4), depth + 1))
    return [ndimage.gaussian_filter(np.asarray(canv[n], np.float32) / 255.0, 0.6)
            for n in ("vein", "artery")]


def render_whole(rng: np.random.Generator, domain: str, width: int = 1024,
                 artefact: float | None = None, uneven: float | None = None):
    """One whole photograph: (image uint8 [H, W, 3], mask uint8 [H, W], info dict).

    ``artefact`` (strength of a bright rim reflection, 0 = none) and ``uneven`` (strength
    of an extra off-axis illumination slope, 0 = none) override the random draw."""
    d = synth.DOMAINS[domain]
    W, H = int(width), round(width * ASPECT)
    side = float(rng.choice([-1.0, 1.0]))  # +1: right eye, disc on the right

    # Field of view: usually about the height (cut at top/bottom when larger), some small.
    small_fov = rng.random() < 0.12
    D = H * (rng.uniform(0.72, 0.85) if small_fov else rng.uniform(0.92, 1.12))
    D = min(D, 0.98 * W)
    fcx = W / 2 + rng.normal(0, 0.01 * W)
    fcy = H / 2 + rng.normal(0, 0.01 * H)
    R = D / 2
    roi = ROI_FRACTION * D

    # Disc geometry (sizes as in grata.synth, relative to the ROI side).
    ry = rng.uniform(*d.disc) * roi / 2
    rx = ry * rng.uniform(0.85, 1.0)
    dd = 2 * ry
    off = rng.uniform(0.05, 0.28) * D  # macula-centred photographs: disc 0.2-0.3 D out
    cx = fcx + side * off
    cy = fcy + rng.normal(0, 0.03 * D)
    tilt = rng.normal(0, 0.15)
    lo, hi, large = d.cdr
    cdr = rng.uniform(hi, min(hi + 0.2, 0.85)) if rng.random() < large else rng.uniform(lo, hi)
    cry = cdr * ry
    crx = min(cry * rng.uniform(0.85, 1.1), 0.9 * rx)
    temporal = -side
    ccx = cx + temporal * rng.uniform(0.0, 0.35) * (rx - crx)
    ccy = cy + rng.uniform(-0.15, 0.15) * (ry - cry)
    mx = cx + temporal * 2.5 * dd  # macula / fovea
    my = cy + rng.normal(0.15, 0.1) * dd

    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    rr = np.sqrt((xx - fcx) ** 2 + (yy - fcy) ** 2) / R  # 1 on the FOV rim

    # Retina: pigmentation and texture, illumination falling off toward the rim, macula.
    tex = _smooth(rng, H, W, 6) * 0.07 + _smooth(rng, H, W, 28) * 0.03
    pig = rng.uniform(0.8, 1.1)
    chan = np.array([1.0, rng.uniform(0.85, 1.15), rng.uniform(0.8, 1.2)], np.float32)
    shade = (1.0 + tex) * (1.0 - 0.3 * np.clip(rr, 0, 1) ** 2
                           - 0.35 * np.clip((rr - 0.85) / 0.15, 0, 1) ** 2)
    q2 = ((xx - mx) ** 2 + (yy - my) ** 2) / dd ** 2
    macula = 1.0 - rng.uniform(0.25, 0.4) * np.exp(-q2 / (2 * 0.7 ** 2)) \
        - 0.15 * np.exp(-q2 / (2 * 0.12 ** 2))
    img = (synth.BG_RGB * pig * chan)[:, None, None] * (shade * macula)[None]

    # Disc, cup pallor, atrophy: rendered in a window around the disc.
    half = int(np.ceil(2.2 * max(rx, ry))) + 4
    x0, x1 = max(0, int(cx) - half), min(W, int(cx) + half)
    y0, y1 = max(0, int(cy) - half), min(H, int(cy) + half)
    px_, py_ = xx[y0:y1, x0:x1], yy[y0:y1, x0:x1]
    win = img[:, y0:y1, x0:x1]
    rho_d = outline_radius(px_, py_, cx, cy, rx, ry, tilt, outline_wobble(rng, 0.05))
    rho_c = outline_radius(px_, py_, ccx, ccy, crx, cry, tilt, outline_wobble(rng, 0.08))
    mask = np.full((H, W), 255, np.uint8)
    mwin = mask[y0:y1, x0:x1]
    mwin[rho_d < 1.0] = 128
    mwin[(rho_c < 1.0) & (rho_d < 1.0)] = 0
    ltex = tex[y0:y1, x0:x1]
    if rng.random() < d.ppa:
        grow = rng.uniform(1.12, 1.35)
        shift = temporal * (grow - 1.0) * rx * rng.uniform(0.6, 1.0)
        rho_p = outline_radius(px_, py_, cx + shift, cy, rx * grow,
                               ry * rng.uniform(1.0, 1.1), tilt, outline_wobble(rng, 0.08))
        a = sigmoid((1.0 - rho_p) / 0.05) * sigmoid((rho_d - 1.0) / 0.04)
        a = a * rng.uniform(0.5, 0.9)
        win = win * (1 - a) + synth.PPA_RGB[:, None, None] * a
    a_d = sigmoid((1.0 - rho_d) / rng.uniform(0.03, 0.07))[None]
    rim = synth.RIM_RGB[:, None, None] * rng.uniform(0.85, 1.05) * (
        1.0 + 0.06 * np.clip(1.0 - rho_d, 0, 1)[None] + 0.03 * ltex[None])
    win = win * (1 - a_d) + rim * a_d
    pal = rng.uniform(0.85, 1.1)
    rho_p = outline_radius(px_, py_, ccx, ccy, crx * pal, cry * pal, tilt,
                           outline_wobble(rng, 0.04))
    a_c = (sigmoid((1.0 - rho_p) / rng.uniform(0.1, 0.22)) * rng.uniform(0.6, 1.0))[None]
    win = win * (1 - a_c) + synth.CUP_RGB[:, None, None] * a_c
    img[:, y0:y1, x0:x1] = win

    vein, artery = _draw_vessels(rng, W, H, (ccx, ccy), side, dd, (fcx, fcy, R * 0.99))
    for v, col, op in ((artery, synth.ARTERY_RGB, 0.7), (vein, synth.VEIN_RGB, 0.8)):
        a = (v * op * rng.uniform(0.85, 1.0))[None]
        img = img * (1 - a) + col[:, None, None] * a

    # Hostile realism: a bright reflection near the rim; strongly uneven illumination.
    if artefact is None:
        artefact = rng.uniform(0.4, 1.2) if rng.random() < 0.25 else 0.0
    if artefact > 0:
        ang = rng.uniform(0, 2 * np.pi)
        ax, ay = fcx + 0.88 * R * np.cos(ang), fcy + 0.88 * R * np.sin(ang)
        sg = rng.uniform(0.35, 0.6) * dd
        glare = artefact * np.exp(-((xx - ax) ** 2 + (yy - ay) ** 2) / (2 * sg * sg))
        img = img + _GLARE[:, None, None] * glare[None]
    if uneven is None:
        uneven = rng.uniform(0.3, 0.6) if rng.random() < 0.25 else 0.0
    if uneven > 0:
        ang = rng.uniform(0, 2 * np.pi)
        slope = ((xx - fcx) * np.cos(ang) + (yy - fcy) * np.sin(ang)) / R
        img = img * (1.0 + uneven * slope)[None]
    img = np.clip(img, 0, None) * sigmoid((1.0 - rr) / 0.004)[None]  # the FOV edge

    # The domain's camera, centred on the FOV (its pixel sizes are at a 320 px ROI).
    cam_x = xx - fcx + W / 2
    cam_y = yy - fcy + W / 2
    out = camera(rng, d, img.astype(np.float32), cam_x, cam_y, roi / 320.0)
    # Stray light stays inside the aperture: outside the FOV only the camera's black
    # level and read noise remain.
    black = 255.0 * d.black + 255.0 * float(np.mean(d.noise)) * np.sqrt(0.2) \
        * rng.standard_normal((H, W), dtype=np.float32)
    keep = sigmoid((1.015 - rr) / 0.004)[..., None]
    out = np.clip(out * keep + black[..., None] * (1 - keep) + 0.5, 0, 255).astype(np.uint8)
    info = {"cx": round(float(cx), 2), "cy": round(float(cy), 2),
            "rx": round(float(rx), 2), "ry": round(float(ry), 2),
            "r": round(float(np.sqrt(rx * ry)), 2),
            "fov": {"cx": round(float(fcx), 2), "cy": round(float(fcy), 2),
                    "d": round(float(D), 2)},
            "eye": "right" if side > 0 else "left",
            "artefact": round(float(artefact), 3), "uneven": round(float(uneven), 3)}
    return out, mask, info


def _save_photo(image: np.ndarray, path: Path, jpeg: bool) -> None:
    if jpeg:
        write_image(image, path, True)
    else:  # fast deflate: photographs are large and noisy (still deterministic)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG", compress_level=1)
        path.write_bytes(buf.getvalue())


def generate_whole(root, seed: int = 0, n_source: tuple[int, int] = (4, 4),
                   n_target: tuple[int, int] = (4, 4), size: int = 1024,
                   progress: bool = True) -> dict:
    """Write whole photographs under root in the CSV layout (``<Domain>_train.csv``,
    ``<Domain>_test.csv``, columns image,mask; full-size masks) and ``synth.json`` with
    the true disc and FOV of every image. ``size`` is the width (height 0.78 size).
    Returns the summary."""
    source, targets = synth.SOURCE_DOMAIN, TARGET_DOMAINS
    counts = synth.split_counts(n_source, n_target, targets, size, 128,
                                "synthetic photographs")
    t0 = time.perf_counter()
    root = Path(root)
    total = sum(sum(c) for c in counts.values())
    truth = synth.write_splits(root, counts, seed, size, render_whole, _save_photo,
                               "synthetic photographs", progress, rng=_rng)
    summary = {
        "generator": "grata.synth_whole", "version": VERSION,
        "camera_version": synth.VERSION, "seed": int(seed),
        "width": int(size), "height": round(size * ASPECT),
        "roi_fraction": ROI_FRACTION, "source": source, "targets": list(targets),
        "domains": {name: {"train": c[0], "test": c[1],
                           "format": "jpg" if synth.DOMAINS[name].jpeg else "png",
                           "shift": synth.DOMAINS[name].shift}
                    for name, c in counts.items()},
        "discs": truth,
    }
    (root / "synth.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {**{k: v for k, v in summary.items() if k != "discs"}, "root": str(root),
            "images": total, "seconds": round(time.perf_counter() - t0, 2)}

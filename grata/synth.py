"""A deterministic synthetic fundus optic disc/cup benchmark, in the CSV layout.

Each image is a region of interest around the optic disc (as the benchmark's 800x800
crops, resized): an orange-red textured retina darkening toward the edges, a bright
yellow-orange disc with a slightly irregular soft edge, a paler cup whose visible
pallor fades into the rim (its edge is not a threshold, and the pallor does not
exactly follow the annotated cup), branching vessels leaving the cup and crossing the
rim, and in some images a pale peripapillary atrophy crescent beside the disc.
Masks: 255 background, 128 disc rim, 0 cup.

One source domain and target domains that differ as centres/cameras do. The first four
targets change the camera; the last eight keep the source's camera and change what the
crop holds (disc size and position, black borders, anatomy), as crops from other
centres, detectors and populations do. The per-image mean and variance of every feature
map follow that composition, so per-image normalisation (BN at batch 1) shifts with it
even though the camera did not change:

============  ==========================================================================
domain        shift (beyond each domain's per-image jitter)
============  ==========================================================================
Clinic        source: desktop camera, clean; mild jitter of exposure, white balance,
              gamma, vignetting and focus; disc 28-42 % of the ROI, vCDR 0.3-0.85
Handheld      defocus blur, uneven illumination (off-axis light, strong vignetting) and
              veiling glare, sensor noise, green LED cast; disc a little larger (30-46 %)
Widefield     scanning-laser pseudo-colour: reduced blue, green-heavy, lower contrast,
              slight blur; wider field of view, so the disc is small (24-34 %)
LowLight      under-exposed non-mydriatic shots: dark, high gamma, strong signal-
              dependent noise, heavy vignetting, cool (blue) white balance
Legacy        scanned film / old archive: yellow faded colours with a raised black level,
              low contrast, stored as JPEG (quality 25); tighter crop (disc 34-46 %) and a
              glaucoma-clinic population (more large cups, vCDR 0.45-0.85)
OffCentre     the crop missed the disc's centre: disc centre 15-30 % of the ROI from the
              crop centre (the disc stays inside); size as the source
WideCrop      crop at a larger scale: small disc (12-20 %), vessel calibre and texture grain
              scaled with it, more background retina and vessels, the macula in view
TightCrop     crop at a smaller scale: the disc fills the ROI (50-65 %), thick vessels
BorderFOV     the crop reaches the photograph's edge: a black circular field-of-view border
              with its dark rim (2 in 3 images) or black bands along one or two sides (a
              corner), about 10-45 % of the crop black; the disc stays visible
Atypical      anatomy: tilted oval discs (width 60-85 % of height), large pale atrophy
              beside every disc, small cups (vCDR 0.12-0.3), 1-3 bright specular reflexes
FarCrop       another clinic's crop rule: a much wider crop (disc 0.35-0.55x the source's
              diameter, 12-19 %), the disc anywhere up to a third of the crop from its
              centre, the field of view's edge in half of the crops, the macula in view
MidCrop       a wider crop (disc 0.55-0.85x the source's, 19-30 %), the disc up to a third
              of the crop from its centre, the field of view's edge in a third of the crops
ScaleDrift    one camera whose crop drifts slowly along the stream (file order): the disc
              from 1.3x the source's diameter (46 %) to 0.35x (12 %) over 30 images and
              back, up to a fifth of the crop off centre
============  ==========================================================================

Pixel sizes (blur) are given at S=320 and scale with the size.

The last three (:data:`SCALE_DOMAINS`) carry what real crops from other clinics do: the
disc at another size and position in the crop than the source model was trained on.

Determinism: every image is drawn from its own PCG64 generator seeded by (seed,
domain, split, index), so changing counts does not change the other images; the same
seed writes byte-identical files (with the same numpy, scipy, Pillow/zlib/libjpeg).
ScaleDrift's stream position is the index in the train split, then
:data:`DRIFT_TRAIN` plus the index in the test split (so it too does not depend on the
counts). Version 4 added the five content targets, version 5 the three scale targets;
the files of the other domains are those of version 4 (the camera domains' those of
version 3, Clinic's those of version 1).
"""

from __future__ import annotations

import csv
import io
import json
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from grata.errors import GrataError

SOURCE_DOMAIN = "Clinic"
# Targets whose camera differs from the source's (unchanged since version 3) ...
CAMERA_DOMAINS = ("Handheld", "Widefield", "LowLight", "Legacy")
# ... and targets with the source's camera whose crops hold other content.
# The last three show the disc at another scale and place, as other clinics' crops do.
SCALE_DOMAINS = ("FarCrop", "MidCrop", "ScaleDrift")
CONTENT_DOMAINS = ("OffCentre", "WideCrop", "TightCrop", "BorderFOV", "Atypical") + SCALE_DOMAINS
TARGET_DOMAINS = CAMERA_DOMAINS + CONTENT_DOMAINS
VERSION = 5  # bump whenever the same seed would give different files
SOURCE_DISC = 0.35  # the source's typical vertical disc diameter, fraction of the ROI
DRIFT_TRAIN = 18    # ScaleDrift: stream position of the first test image
DRIFT_LENGTH = 30   # ScaleDrift: images from one end of the drift to the other
JPEG_QUALITY = 25

_SPLIT_IDS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class Domain:
    """Scene statistics and camera model of one domain (pixel sizes are at S=320)."""
    disc: tuple[float, float]          # vertical disc diameter, fraction of the ROI
    cdr: tuple[float, float, float]    # vCDR: low, high, share of large (glaucomatous) cups
    gains: tuple[float, float, float]  # white balance (R, G, B)
    exposure: tuple[float, float]
    gamma: tuple[float, float]
    contrast: tuple[float, float]
    black: float = 0.0                 # raised black level (faded film)
    vignette: tuple[float, float] = (0.1, 0.25)
    gradient: tuple[float, float] = (0.0, 0.1)  # off-axis illumination slope
    blur: tuple[float, float] = (0.0, 0.4)      # Gaussian sigma, px
    noise: tuple[float, float] = (0.003, 0.008)  # noise sigma at full signal
    blue_keep: float = 1.0             # scanning-laser images carry little blue
    haze: tuple[float, float] = (0.0, 0.0)  # veiling glare (stray light) strength
    ppa: float = 0.4                   # share of images with peripapillary atrophy
    jpeg: bool = False
    shift: str = ""
    # Content of the crop (the defaults are the source's; each non-default value draws
    # its own random numbers, so the domains that keep the defaults keep their bytes).
    centre: tuple[float, float] | None = None  # disc centre's distance from the crop
    #                                            centre (fraction of S); None: small jitter
    aspect: tuple[float, float] = (0.85, 1.0)  # disc width / height
    tilt: float = 0.15                 # standard deviation of the disc's rotation, rad
    ppa_size: tuple[float, float] = (1.12, 1.35)  # atrophy extent, in disc radii
    ppa_alpha: tuple[float, float] = (0.5, 0.9)   # atrophy pallor
    rescale: bool = False              # crop at another scale: vessel calibre, vessel
    #                                    length and texture grain follow the disc size
    macula: bool = False               # the darker macula enters the crop temporally
    fov: bool = False                  # the crop reaches the photograph's black border
    reflex: tuple[int, int] = (0, 0)   # number of bright specular reflexes (low, high)
    fov_share: float = 1.0             # share of the crops that reach it (with fov)
    drift: tuple[float, float] | None = None  # disc diameter at the stream's start and
    #                                    after DRIFT_LENGTH images, fraction of the ROI
    min_rim: int = 0                   # pixels of rim kept around the cup (small discs)


DOMAINS: dict[str, Domain] = {
    "Clinic": Domain(
        disc=(0.28, 0.42), cdr=(0.3, 0.65, 0.2), gains=(1.0, 1.0, 1.0), exposure=(0.8, 1.0),
        gamma=(0.85, 1.15), contrast=(0.9, 1.05), vignette=(0.1, 0.3), blur=(0.0, 0.6),
        shift="source: clean desktop camera"),
    "Handheld": Domain(
        disc=(0.30, 0.46), cdr=(0.3, 0.65, 0.2), gains=(0.85, 1.15, 0.72),
        exposure=(0.8, 1.05), gamma=(0.9, 1.2), contrast=(0.85, 1.0), vignette=(0.35, 0.55),
        gradient=(0.2, 0.4), blur=(1.8, 3.0), noise=(0.015, 0.025), haze=(0.05, 0.15),
        shift="defocus blur, uneven illumination and glare, sensor noise, green LED cast"),
    "Widefield": Domain(
        disc=(0.24, 0.34), cdr=(0.3, 0.65, 0.2), gains=(0.92, 1.1, 1.0), exposure=(0.8, 1.0),
        gamma=(0.8, 0.95), contrast=(0.8, 0.9), blur=(0.5, 0.9), blue_keep=0.75,
        shift="laser pseudo-colour (less blue, green-heavy), low contrast, small disc"),
    "LowLight": Domain(
        disc=(0.28, 0.42), cdr=(0.3, 0.65, 0.2), gains=(0.8, 1.0, 1.5),
        exposure=(0.3, 0.45), gamma=(1.3, 1.6), contrast=(0.95, 1.05), vignette=(0.45, 0.65),
        noise=(0.03, 0.05),
        shift="under-exposed, high gamma, strong noise, heavy vignetting, blue cast"),
    "Legacy": Domain(
        disc=(0.34, 0.46), cdr=(0.45, 0.75, 0.4), gains=(1.04, 0.95, 0.76),
        exposure=(0.85, 1.0), gamma=(0.9, 1.0), contrast=(0.78, 0.9), black=0.06,
        blur=(0.4, 0.8), jpeg=True,
        shift="yellow faded film, raised black level, low contrast, JPEG q25, large disc "
              "and cups"),
}
_CLINIC = DOMAINS[SOURCE_DOMAIN]
# Same camera as the source: only what the crop shows changes, and with it the per-image
# statistics of every feature map (how much of the crop is disc, retina, vessel, black).
DOMAINS.update({
    "OffCentre": replace(
        _CLINIC, centre=(0.15, 0.3),
        shift="disc off-centre (centre 15-30 % of the ROI from the crop centre)"),
    "WideCrop": replace(
        _CLINIC, disc=(0.12, 0.2), rescale=True, macula=True,
        shift="crop at a larger scale: small disc (12-20 %), more retina and vessels, "
              "macula in view"),
    "TightCrop": replace(
        _CLINIC, disc=(0.5, 0.65), rescale=True,
        shift="crop at a smaller scale: the disc fills the ROI (50-65 %)"),
    "BorderFOV": replace(
        _CLINIC, fov=True,
        shift="black field-of-view border in the crop (circular aperture edge or black "
              "corner)"),
    "Atypical": replace(
        _CLINIC, aspect=(0.6, 0.85), tilt=0.4, ppa=1.0, ppa_size=(1.3, 1.7),
        ppa_alpha=(0.7, 1.0), cdr=(0.12, 0.3, 0.0), reflex=(1, 3),
        shift="tilted oval discs, large atrophy, small cups (vCDR 0.12-0.3), bright "
              "reflexes"),
    # Another clinic's crop: the disc at another scale and anywhere in the central two
    # thirds of the crop (a field of view's edge enters the wider crops).
    "FarCrop": replace(
        _CLINIC, disc=(0.35 * SOURCE_DISC, 0.55 * SOURCE_DISC), centre=(0.0, 1 / 3),
        rescale=True, macula=True, fov=True, fov_share=0.5, min_rim=1,
        shift="a much wider crop: disc 0.35-0.55x the source's diameter, up to a third "
              "of the crop off centre, the field of view's edge in half of the crops"),
    "MidCrop": replace(
        _CLINIC, disc=(0.55 * SOURCE_DISC, 0.85 * SOURCE_DISC), centre=(0.0, 1 / 3),
        rescale=True, fov=True, fov_share=1 / 3, min_rim=1,
        shift="a wider crop: disc 0.55-0.85x the source's diameter, up to a third of the "
              "crop off centre, the field of view's edge in a third of the crops"),
    "ScaleDrift": replace(
        _CLINIC, disc=(0.35 * SOURCE_DISC, 1.3 * SOURCE_DISC), centre=(0.0, 0.2),
        rescale=True, drift=(1.3 * SOURCE_DISC, 0.35 * SOURCE_DISC), min_rim=1,
        shift="one camera's crop drifting along the stream: disc from 1.3x the source's "
              "diameter to 0.35x over 30 images and back, up to a fifth off centre"),
})
assert set(DOMAINS) == {SOURCE_DOMAIN, *TARGET_DOMAINS}

# Scene colours (linear RGB, before the camera).
BG_RGB = np.array([0.72, 0.30, 0.12], np.float32)
RIM_RGB = np.array([0.92, 0.52, 0.30], np.float32)
CUP_RGB = np.array([1.00, 0.92, 0.74], np.float32)
PPA_RGB = np.array([0.88, 0.70, 0.50], np.float32)
VEIN_RGB = np.array([0.40, 0.07, 0.05], np.float32)
ARTERY_RGB = np.array([0.55, 0.13, 0.07], np.float32)


def _rng(seed: int, domain: str, split: str, index: int) -> np.random.Generator:
    key = [int(seed), zlib.crc32(domain.encode()), _SPLIT_IDS[split], int(index)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std low-frequency noise: a coarse grid, Gaussian-smoothed (so
    the grid does not show) and spline-upsampled."""
    from scipy import ndimage
    coarse = ndimage.gaussian_filter(rng.standard_normal((cells, cells)), 0.7, mode="wrap")
    up = ndimage.zoom(coarse, size / cells, order=3, mode="grid-wrap", grid_mode=True)
    up = up[:size, :size]
    return ((up - up.mean()) / (up.std() + 1e-6)).astype(np.float32)


def outline_radius(xx, yy, cx, cy, rx, ry, tilt, wobble) -> np.ndarray:
    """Normalised elliptic radius (1 on the boundary) of a shape with a wavy outline."""
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    c, s = np.float32(np.cos(tilt)), np.float32(np.sin(tilt))
    u, v = (c * dx + s * dy) / np.float32(rx), (-s * dx + c * dy) / np.float32(ry)
    r = np.sqrt(u * u + v * v)
    z = (u + 1j * v).astype(np.complex64) / np.maximum(r, 1e-6)  # e^(i theta)
    edge, zk = np.ones_like(r), z * z
    for k, a, p in wobble:  # sum of a cos(k theta + p), k = 2, 3, ...
        edge += np.float32(a) * (zk * np.complex64(np.exp(1j * p))).real
        zk = zk * z
    return r / edge


def outline_wobble(rng, amount: float):
    """Random harmonics (k, amplitude, phase), k = 2..5, of an outline for `outline_radius`."""
    return [(k, amount * rng.uniform(0.3, 1.0) / k, rng.uniform(0, 2 * np.pi))
            for k in range(2, 6)]


def sigmoid(x):
    """The logistic function, its argument clipped so exp never overflows."""
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def _vessels(rng, size: int, origin, side: float, cup_r: float, scale: float = 1.0):
    """Vessel opacity maps (veins, arteries) [S, S] in [0, 1], drawn at 2x for smooth
    edges: arcades leaving the cup up and down and bending temporally, smaller nasal
    and temporal vessels, random branching, tapering width. `scale`: anatomy size
    relative to the source's crops (calibre and step scale with it, length against it)."""
    from scipy import ndimage
    k = 2  # supersampling
    canv = {"vein": Image.new("L", (size * k, size * k)),
            "artery": Image.new("L", (size * k, size * k))}
    draws = {n: ImageDraw.Draw(c) for n, c in canv.items()}
    temporal = 0.0 if side > 0 else np.pi
    nasal = np.pi - temporal
    step = size * scale / 70.0
    w_main = rng.uniform(0.018, 0.024) * size * scale

    trunks = []
    for up in (-1.0, 1.0):  # superior and inferior arcades: a vein and an artery each
        for kind, wf in (("vein", 1.0), ("artery", 0.75)):
            h = up * np.pi / 2 + rng.uniform(-0.3, 0.3)
            trunks.append((kind, h, w_main * wf * rng.uniform(0.85, 1.1), 0.035, 110))
    for _ in range(rng.integers(2, 5)):  # nasal
        trunks.append((("vein", "artery")[rng.integers(2)], nasal + rng.uniform(-0.9, 0.9),
                       w_main * rng.uniform(0.35, 0.6), 0.0, 60))
    for _ in range(rng.integers(1, 4)):  # small temporal (macular) branches
        trunks.append((("vein", "artery")[rng.integers(2)],
                       temporal + rng.uniform(-0.7, 0.7), w_main * rng.uniform(0.3, 0.45),
                       0.0, 50))

    stack = []
    for kind, h, w, bend, steps in trunks:
        a = rng.uniform(0, 2 * np.pi)
        r = cup_r * rng.uniform(0.0, 0.35)
        stack.append((kind, origin[0] + r * np.cos(a), origin[1] + r * np.sin(a), h, w, bend,
                      steps, 0))
    if scale != 1.0:  # smaller anatomy: longer in steps, to reach the crop's edge
        stack = [(*t[:6], round(t[6] / scale), t[7]) for t in stack]
    while stack:
        kind, x, y, h, w, bend, steps, depth = stack.pop()
        draw = draws[kind]
        for i in range(steps):
            if bend:  # turn toward the temporal side, as the arcades do
                h += bend * np.sin(temporal - h)
            h += rng.normal(0, 0.07)
            nx, ny = x + step * np.cos(h), y + step * np.sin(h)
            wd = max(w * k, 1.0)
            # Thin vessels are fainter; veins darker than arteries.
            fill = int((255 if kind == "vein" else 215) * min(1.0, 0.35 + w / w_main))
            draw.line([(x * k, y * k), (nx * k, ny * k)], fill=fill, width=round(wd))
            if wd >= 4:  # round joints; on thin lines they would look beaded
                draw.ellipse([nx * k - wd / 2, ny * k - wd / 2, nx * k + wd / 2,
                              ny * k + wd / 2], fill=fill)
            x, y, w = nx, ny, w * 0.993
            if not (-0.1 * size < x < 1.1 * size and -0.1 * size < y < 1.1 * size):
                break
            if depth < 2 and i > 4 and w > 1.2 and rng.random() < 0.05:
                stack.append((kind, x, y, h + rng.choice([-1, 1]) * rng.uniform(0.45, 1.0),
                              w * rng.uniform(0.5, 0.75), 0.0, int(steps * 0.5), depth + 1))
    out = []
    for n in ("vein", "artery"):
        small = canv[n].resize((size, size), Image.BOX)
        out.append(ndimage.gaussian_filter(np.asarray(small, np.float32) / 255.0, 0.5))
    return out


def render(rng: np.random.Generator, domain: str | Domain, size: int, stream_index: int = 0):
    """One (image uint8 [S,S,3], mask uint8 [S,S]) of the domain (a name of DOMAINS or a
    Domain of one's own). ``stream_index``: the image's position in its stream (only a
    drifting domain looks at it)."""
    d = domain if isinstance(domain, Domain) else DOMAINS[domain]
    S = size
    px = S / 320.0  # pixel sizes of the camera model are given at S = 320
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    side = rng.choice([-1.0, 1.0])  # eye laterality: which side is temporal

    # Geometry: disc, cup (offset temporally), optional atrophy crescent.
    if d.drift is None:
        dv = rng.uniform(*d.disc) * S
    else:  # the camera's scale at this point of the stream, and the eye's own size
        dv = float(np.clip(drift_diameter(d.drift, stream_index) * rng.uniform(0.92, 1.08),
                           *d.disc)) * S
    ry = dv / 2
    rx = ry * rng.uniform(*d.aspect)
    if d.centre is None:
        cx, cy = (S / 2 + np.clip(rng.normal(0, 0.05 * S, 2), -0.1 * S, 0.1 * S))
    else:  # a detector's crop that missed the centre; the disc stays inside the crop
        off, ang, lim = rng.uniform(*d.centre) * S, rng.uniform(0, 2 * np.pi), S / 2 - 1.1 * ry
        cx = S / 2 + np.clip(off * np.cos(ang), -lim, lim)
        cy = S / 2 + np.clip(off * np.sin(ang), -lim, lim)
    tilt = rng.normal(0, d.tilt)
    # Anatomy scale against the source's crops (disc about 35 % of the ROI).
    anat = dv / (0.35 * S) if d.rescale else 1.0
    lo, hi, large = d.cdr
    cdr = rng.uniform(hi, min(hi + 0.2, 0.85)) if rng.random() < large else rng.uniform(lo, hi)
    cry = cdr * ry
    crx = min(cry * rng.uniform(0.85, 1.1), 0.9 * rx)
    ccx = cx + side * rng.uniform(0.0, 0.35) * (rx - crx)
    ccy = cy + rng.uniform(-0.15, 0.15) * (ry - cry)
    rho_d = outline_radius(xx, yy, cx, cy, rx, ry, tilt, outline_wobble(rng, 0.05))
    rho_c = outline_radius(xx, yy, ccx, ccy, crx, cry, tilt, outline_wobble(rng, 0.08))
    disc = rho_d < 1.0
    cup = (rho_c < 1.0) & disc
    if d.min_rim:  # a disc a few pixels wide still has a rim between cup and background
        from scipy import ndimage
        cup &= ndimage.binary_erosion(disc, iterations=d.min_rim)
    mask = np.full((S, S), 255, np.uint8)
    mask[disc] = 128
    mask[cup] = 0

    # Retina: pigmentation, low-frequency texture, darker toward the ROI edges.
    tex = (_smooth_noise(rng, S, _cells(4, anat)) * 0.08
           + _smooth_noise(rng, S, _cells(16, anat)) * 0.035)
    pig = rng.uniform(0.8, 1.1)
    bg = BG_RGB[:, None, None] * pig * np.stack([np.ones_like(xx),
                                              np.full_like(xx, rng.uniform(0.85, 1.15)),
                                              np.full_like(xx, rng.uniform(0.8, 1.2))])
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (0.75 * S) ** 2
    img = bg * (1.0 + tex) * (1.0 - 0.35 * np.clip(r2, 0, 1.5))[None]
    if d.macula:  # darker (red least), about 2.5 disc diameters temporal, a little lower
        mx = cx + side * rng.uniform(2.2, 2.8) * dv
        my = cy + rng.uniform(0.1, 0.4) * dv
        dark = rng.uniform(0.3, 0.5) * np.exp(
            -((xx - mx) ** 2 + (yy - my) ** 2) / (2 * (rng.uniform(0.5, 0.8) * dv) ** 2))
        img = img * (1.0 - dark[None] * np.array([0.8, 1.0, 1.0], np.float32)[:, None, None])

    # Peripapillary atrophy: pale mottled crescent on the temporal side of the disc.
    if rng.random() < d.ppa:
        grow = rng.uniform(*d.ppa_size)
        shift = side * (grow - 1.0) * rx * rng.uniform(0.6, 1.0)
        rho_p = outline_radius(xx, yy, cx + shift, cy, rx * grow,
                               ry * rng.uniform(1.0, 1.1), tilt, outline_wobble(rng, 0.08))
        a = sigmoid((1.0 - rho_p) / 0.05) * sigmoid((rho_d - 1.0) / 0.04)
        a = (a * np.clip(0.75 + 0.5 * _smooth_noise(rng, S, _cells(24, anat)), 0, 1)
             * rng.uniform(*d.ppa_alpha))
        img = img * (1 - a) + PPA_RGB[:, None, None] * a

    # Disc with a blurred edge; its rim is orange-pink, brightening toward the cup.
    a_d = sigmoid((1.0 - rho_d) / rng.uniform(0.03, 0.07))[None]
    rim = RIM_RGB[:, None, None] * rng.uniform(0.85, 1.05) * (
        1.0 + 0.06 * np.clip(1.0 - rho_d, 0, 1)[None] + 0.03 * tex[None])
    img = img * (1 - a_d) + rim * a_d
    # Cup pallor: yellow-white, fading into the rim over a wide band; its extent only
    # roughly follows the annotated cup, as in real photographs.
    pal = rng.uniform(0.85, 1.1)
    rho_p = outline_radius(xx, yy, ccx, ccy, crx * pal, cry * pal, tilt,
                           outline_wobble(rng, 0.04))
    a_c = (sigmoid((1.0 - rho_p) / rng.uniform(0.1, 0.22)) * rng.uniform(0.6, 1.0))[None]
    cupc = CUP_RGB[:, None, None] * (1.0 + 0.05 * np.clip(1.0 - rho_p, 0, 1)[None])
    img = img * (1 - a_c) + cupc * a_c

    # Vessels over everything (they occlude the rim).
    vein, artery = _vessels(rng, S, (ccx, ccy), side, min(crx, cry), anat)
    for v, col, op in ((artery, ARTERY_RGB, 0.7), (vein, VEIN_RGB, 0.8)):
        a = (v * op * rng.uniform(0.85, 1.0))[None]
        img = img * (1 - a) + col[:, None, None] * a

    if d.reflex[1] > 0:
        img = img + _reflexes(rng, d.reflex, xx, yy)
    if d.fov and (d.fov_share >= 1.0 or rng.random() < d.fov_share):
        img = img * _field_of_view(rng, xx, yy, cx, cy, 1.2 * max(rx, ry), px, anat)[None]
    return camera(rng, d, img, xx, yy, px), mask


def drift_diameter(drift: tuple[float, float], stream_index: int) -> float:
    """A drifting domain's disc diameter (fraction of the ROI) at a stream position:
    geometric from ``drift[0]`` to ``drift[1]`` over DRIFT_LENGTH images, then back."""
    t = (int(stream_index) % (2 * DRIFT_LENGTH)) / DRIFT_LENGTH
    t = 2.0 - t if t > 1.0 else t
    return float(drift[0] * (drift[1] / drift[0]) ** t)


def stream_index(split: str, index: int) -> int:
    """An image's position in its domain's stream (train rows, then test rows) that does
    not depend on the counts: the train index, or DRIFT_TRAIN plus the test index."""
    return int(index) + (DRIFT_TRAIN if split == "test" else 0)


def _cells(cells: int, scale: float) -> int:
    """Grid cells of a texture whose grain follows the anatomy's scale."""
    return cells if scale == 1.0 else max(2, round(cells / scale))


def _reflexes(rng, count, xx, yy):
    """Additive whitish light [3, S, S] of specular reflexes (retinal sheen, lens or
    cornea): elongated soft-edged patches anywhere in the crop."""
    S = xx.shape[0]
    light = np.zeros_like(xx)
    for _ in range(rng.integers(count[0], count[1] + 1)):
        x0, y0 = rng.uniform(0.1, 0.9, 2) * S
        ry = rng.uniform(0.02, 0.07) * S
        rho = outline_radius(xx, yy, x0, y0, ry * rng.uniform(0.25, 1.0), ry,
                             rng.uniform(0, np.pi), outline_wobble(rng, 0.15))
        light += rng.uniform(0.4, 1.0) * sigmoid((1.0 - rho) / 0.25)
    return light[None] * np.array([1.0, 0.97, 0.92], np.float32)[:, None, None]


def _field_of_view(rng, xx, yy, cx, cy, keep, px, scale=1.0):
    """Transmission [S, S] of the photograph's field of view where the crop reaches its
    edge: a black circular aperture edge with the dark rim inside it (illumination falls
    off toward the aperture), or, for a crop that runs past the photograph, black bands
    on one or two adjacent sides (a corner). The disc (radius `keep`) stays visible.
    `scale`: anatomy size against the source's crops (a wider crop sees a rounder edge)."""
    S = xx.shape[0]
    if rng.random() < 0.65:
        ang = rng.uniform(0, 2 * np.pi)
        big = rng.uniform(1.2, 2.5) * S * scale  # aperture radius: the edge curves gently
        gap = max(rng.uniform(0.16, 0.36) * S, keep)  # disc centre to the edge
        ox, oy = cx + (gap - big) * np.cos(ang), cy + (gap - big) * np.sin(ang)
        inside = big - np.sqrt((xx - ox) ** 2 + (yy - oy) ** 2)
        rim = rng.uniform(0.3, 0.6) * np.exp(-np.maximum(inside, 0) / (
            rng.uniform(0.03, 0.07) * S))
        return sigmoid(inside / (0.6 * px)) * (1.0 - rim)
    # Room between the disc and each side (left, right, top, bottom).
    room = np.array([cx - keep, S - cx - keep, cy - keep, S - cy - keep])
    first = int(rng.integers(4))
    sides = [first]
    if rng.random() < 0.5:  # a corner: one vertical and one horizontal side
        sides.append(int(rng.integers(2)) + (2 if first < 2 else 0))
    out = np.ones_like(xx)
    for k in sides:
        width = min(rng.uniform(0.1, 0.3) * S, room[k] - 0.02 * S)
        dist = (xx, S - xx, yy, S - yy)[k] - width  # > 0: inside the photograph
        out *= sigmoid(dist / (0.6 * px))
    return out


def camera(rng, d: Domain, img, xx, yy, px):
    """Illumination, white balance, exposure, tone curve, blur, noise, 8-bit."""
    from scipy import ndimage
    S = img.shape[-1]
    ang = rng.uniform(0, 2 * np.pi)
    slope = rng.uniform(*d.gradient)
    ox, oy = (xx / S - 0.5), (yy / S - 0.5)
    r2 = (ox ** 2 + oy ** 2) / 0.5
    illum = (1.0 - rng.uniform(*d.vignette) * r2) * (1.0 + slope * (np.cos(ang) * ox
                                                                  + np.sin(ang) * oy) * 2)
    gains = np.array(d.gains, np.float32) * rng.uniform(0.92, 1.08, 3).astype(np.float32)
    gains[2] *= d.blue_keep
    img = img * illum[None] * gains[:, None, None] * rng.uniform(*d.exposure)
    haze = rng.uniform(*d.haze)
    if haze > 0:  # stray light: a whitish veil, strongest off-centre
        hx, hy = rng.uniform(-0.4, 0.4, 2)
        img = img + haze * np.exp(-((ox - hx) ** 2 + (oy - hy) ** 2) / 0.18)[None]
    mean = img.mean(axis=(1, 2), keepdims=True)
    img = mean + rng.uniform(*d.contrast) * (img - mean)
    img = d.black + (1.0 - d.black) * np.clip(img, 0.0, 1.0) ** rng.uniform(*d.gamma)
    sigma = rng.uniform(*d.blur) * px
    if sigma > 0.3:
        img = ndimage.gaussian_filter(img, (0, sigma, sigma))
    level = rng.uniform(*d.noise)
    # Signal-dependent (shot) plus a floor of read noise.
    std = level * np.sqrt(0.8 * np.clip(img, 0, 1) + 0.2)
    img = img + std * rng.standard_normal(img.shape, dtype=np.float32)
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(1, 2, 0))


def write_image(image: np.ndarray, path: Path, jpeg: bool) -> None:
    """Write deterministically (no timestamps or other metadata)."""
    buf = io.BytesIO()
    if jpeg:
        Image.fromarray(image, "RGB").save(buf, "JPEG", quality=JPEG_QUALITY, optimize=False)
    else:
        Image.fromarray(image).save(buf, "PNG", compress_level=6)
    path.write_bytes(buf.getvalue())


def split_counts(n_source, n_target, targets, size: int, min_size: int, what: str) -> dict:
    """{domain: (train, test)} for the source and `targets`, or a one-line `GrataError`
    for a size below `min_size` or a negative or malformed count."""
    counts = {SOURCE_DOMAIN: tuple(n_source), **{t: tuple(n_target) for t in targets}}
    if size < min_size or any(len(c) != 2 or min(c) < 0 for c in counts.values()):
        raise GrataError(f"{what}: need size >= {min_size} and (train, test) counts >= 0, "
                         f"got size {size}, source {n_source}, target {n_target}")
    return counts


def write_splits(root: Path, counts: dict, seed: int, size: int, render_one, save_image,
                 desc: str, progress: bool, rng=None) -> dict:
    """Render and write every image of ``counts`` ({domain: (train, test)}) under root:
    ``<Domain>/<split>/{image,mask}/`` files and the ``<Domain>_<split>.csv`` lists, in
    one deterministic order. ``render_one(rng, domain, size)`` gives (image, mask, extra),
    ``save_image(image, path, jpeg)`` writes an image; ``rng(seed, domain, split, i)``
    seeds each image (default: this module's). Returns {image path: extra}."""
    rng = rng or _rng
    root.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(sum(c) for c in counts.values()), desc=desc, unit="img",
               disable=not progress)
    extras = {}
    for domain, (n_train, n_test) in counts.items():
        jpeg = DOMAINS[domain].jpeg
        ext = ".jpg" if jpeg else ".png"
        for split, n in (("train", n_train), ("test", n_test)):
            rows = []
            for sub in ("image", "mask"):
                (root / domain / split / sub).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image, mask, extra = render_one(rng(seed, domain, split, i), domain, size)
                stem = f"{domain}_{split}_{i:04d}"
                rel_img = f"{domain}/{split}/image/{stem}{ext}"
                rel_mask = f"{domain}/{split}/mask/{stem}.png"
                save_image(image, root / rel_img, jpeg)
                write_image(mask, root / rel_mask, False)
                rows.append((rel_img, rel_mask))
                extras[rel_img] = extra
                bar.update()
            with open(root / f"{domain}_{split}.csv", "w", newline="") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(["image", "mask"])
                w.writerows(rows)
    bar.close()
    return extras


def generate(root, seed: int = 0, n_source: tuple[int, int] = (80, 20),
             n_target: tuple[int, int] = (18, 12), size: int = 320,
             progress: bool = True) -> dict:
    """Write the benchmark under root: ``<Domain>/<split>/{image,mask}/`` files,
    ``<Domain>_train.csv`` and ``<Domain>_test.csv`` (columns image,mask, paths relative
    to root) and ``synth.json``. Returns the summary (also in synth.json)."""
    counts = split_counts(n_source, n_target, TARGET_DOMAINS, size, 32, "synthetic benchmark")
    t0 = time.perf_counter()
    root = Path(root)
    total = sum(sum(c) for c in counts.values())
    # Each image's generator travels with its stream position (a drifting domain's scale).
    write_splits(root, counts, seed, size,
                 lambda at, d, s: (*render(at[0], d, s, stream_index=at[1]), None),
                 write_image, "synthetic fundus", progress,
                 rng=lambda *key: (_rng(*key), stream_index(*key[2:])))
    summary = {
        "generator": "grata.synth", "version": VERSION, "seed": int(seed), "size": int(size),
        "source": SOURCE_DOMAIN, "targets": list(TARGET_DOMAINS),
        "domains": {name: {"train": c[0], "test": c[1],
                           "format": "jpg" if DOMAINS[name].jpeg else "png",
                           "shift": DOMAINS[name].shift} for name, c in counts.items()},
    }
    (root / "synth.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "root": str(root), "images": total,
            "seconds": round(time.perf_counter() - t0, 2)}

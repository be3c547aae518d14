"""The optic disc's scale in a model's training crops, which travels with the model.

A segmentation model learns the disc at the size and place its training crops show it;
another clinic's crop rule shows it elsewhere. This module measures that scale from the
training masks, keeps it beside the checkpoint (``<checkpoint>.scale.json``) and in the
artifact manifest (``disc_scale``), and tells a run which scale its model expects.

One definition everywhere: the disc's **diameter** is its vertical diameter as the
vertical cup-to-disc ratio reads it (`grata.metrics.vertical_diameter`: the most disc
pixels in any one column), divided by the crop's height; its **centre** is the mean of
its pixel centres; its **offset** is the centre's distance from the crop's centre over
the crop's side (the mean of height and width). Torch-free.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from grata.atomic import write_atomic
from grata.errors import GrataError
from grata.metrics import vertical_diameter

SIDECAR_SUFFIX = ".scale.json"
FORMAT = "grata-disc-scale"
FORMAT_VERSION = 1
# A diameter given on the command line has no measured spread: take the training
# augmentation's own (+-15 % zoom) and the source crops' offsets as what is plausible.
GIVEN_SPREAD = 0.15
GIVEN_OFFSET = (0.05, 0.1)
DIAMETER_HELP = (
    "the disc's vertical diameter over the crop's side in the model's training crops "
    "(median); from an area fraction a (disc area / crop area) d = sqrt(4a/pi), e.g. "
    "a = 0.10 gives d = 0.36. Measure it from the training masks with "
    "'grata train-source --scale-only --data ROOT --domain D --size S --out CKPT'")


@dataclass(frozen=True)
class DiscScale:
    """Where and how large the disc is in a model's training crops (fractions of the
    crop's side; see the module for the definitions). ``n`` is the number of masks
    measured, 0 for a diameter given by hand."""

    diameter: float      # median vertical disc diameter / crop height
    low: float           # its 10th percentile
    high: float          # its 90th percentile
    offset: float        # median distance of the disc centre from the crop centre / side
    offset_high: float   # its 90th percentile
    n: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj, where: str = "disc scale") -> DiscScale:
        """Read `to_json`'s dict back; anything malformed is one `GrataError` line."""
        if not isinstance(obj, dict):
            raise GrataError(f"{where}: expected an object with the disc's scale")
        values = {}
        for name in ("diameter", "low", "high", "offset", "offset_high", "n"):
            v = obj.get(name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise GrataError(f"{where}: field {name!r} should be a finite number")
            values[name] = int(v) if name == "n" else float(v)
        scale = cls(**values)
        if not (0 < scale.low <= scale.diameter <= scale.high < 2
                and 0 <= scale.offset <= scale.offset_high < 1 and scale.n >= 0):
            raise GrataError(f"{where}: implausible values {scale.to_json()} (expected "
                             f"0 < low <= diameter <= high < 2, 0 <= offset <= offset_high < 1)")
        return scale

    @classmethod
    def given(cls, diameter: float) -> DiscScale:
        """A scale from a diameter alone (``--disc-scale``): the spread and offsets are the
        module's assumptions (GIVEN_SPREAD, GIVEN_OFFSET), ``n`` is 0."""
        d = float(diameter)
        if not (math.isfinite(d) and 0.02 <= d <= 1.5):
            raise GrataError(f"--disc-scale {diameter!r}: expected the disc's diameter over "
                             f"the crop's side, between 0.02 and 1.5 (e.g. 0.35)")
        return cls(d, d * (1 - GIVEN_SPREAD), d * (1 + GIVEN_SPREAD), *GIVEN_OFFSET, 0)

    def describe(self) -> str:
        """One line for logs and reports."""
        how = f"measured on {self.n} training masks" if self.n else "given"
        return (f"disc diameter {self.diameter:.3f} of the crop (10-90 %: {self.low:.3f}-"
                f"{self.high:.3f}), centre {self.offset:.3f} from the middle; {how}")


def disc_geometry(disc) -> tuple[float, float, float] | None:
    """``(cx, cy, d)`` of a disc mask [H, W] in pixels: the mean of its pixel centres
    (pixel column j spans [j, j + 1)) and its vertical diameter; None when empty."""
    m = np.asarray(disc)
    m = m if m.dtype == np.bool_ else m >= 0.5
    if m.ndim != 2:
        raise GrataError(f"expected one [H, W] disc mask, got shape {m.shape}")
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return None
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, float(vertical_diameter(m))


def measure_disc_scale(masks) -> DiscScale:
    """The scale of the discs in training masks: an iterable of disc masks [H, W] (bool,
    or >= 0.5 is disc) or of [2, H, W] targets (channel 0, the disc with the cup), at
    any resolution. Masks without a disc are left out; none with one is a `GrataError`."""
    diam, off = [], []
    for m in masks:
        m = np.asarray(m)
        if m.ndim == 3:
            m = m[0]
        g = disc_geometry(m)
        if g is None:
            continue
        h, w = m.shape
        diam.append(g[2] / h)
        off.append(math.hypot(g[0] - w / 2, g[1] - h / 2) / ((h + w) / 2))
    if not diam:
        raise GrataError("no disc in any training mask: cannot measure the disc's scale")
    d, o = np.asarray(diam), np.asarray(off)
    return DiscScale(float(np.median(d)), float(np.percentile(d, 10)),
                     float(np.percentile(d, 90)), float(np.median(o)),
                     float(np.percentile(o, 90)), len(d))


# ----------------------------------------------------------------------------- storage

def sidecar_path(checkpoint) -> Path:
    """Where a checkpoint's scale is kept: ``<checkpoint>.scale.json`` beside it."""
    p = Path(checkpoint)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def write_sidecar(checkpoint, scale: DiscScale, measured_on: dict | None = None) -> Path:
    """Write the scale beside the checkpoint (atomically); ``measured_on`` says from what
    (data, domain, size). Returns the sidecar's path."""
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, "disc_scale": scale.to_json()}
    if measured_on:
        body["measured_on"] = measured_on
    path = sidecar_path(checkpoint)
    write_atomic(path, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
    return path


def read_sidecar(checkpoint) -> DiscScale | None:
    """The scale kept beside a checkpoint, None when there is none; a sidecar that is not
    one is a `GrataError` line (never silently unscaled)."""
    path = sidecar_path(checkpoint)
    if not path.is_file():
        return None
    where = str(path)
    try:
        body = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GrataError(f"{where}: not a readable disc scale ({type(exc).__name__})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT \
            or body.get("format_version") != FORMAT_VERSION:
        raise GrataError(f"{where}: not a {FORMAT} file of version {FORMAT_VERSION}")
    return DiscScale.from_json(body.get("disc_scale"), where)


def model_scale(manifest: dict | None = None, checkpoint=None, diameter: float | None = None
                ) -> tuple[DiscScale | None, str]:
    """The scale a run's model expects and one line saying where it came from: the
    ``--disc-scale`` value (``diameter``) wins, then the artifact manifest's
    ``disc_scale``, then the checkpoint's sidecar. None (with the line to print) when
    none is known: the images are then segmented at the scale they come in."""
    if diameter is not None:
        scale = DiscScale.given(diameter)
        return scale, f"disc scale: {scale.describe()} (--disc-scale)"
    if manifest is not None and manifest.get("disc_scale") is not None:
        scale = DiscScale.from_json(manifest["disc_scale"], "manifest field 'disc_scale'")
        return scale, f"disc scale: {scale.describe()} (artifact manifest)"
    if checkpoint is not None:
        scale = read_sidecar(checkpoint)
        if scale is not None:
            return scale, f"disc scale: {scale.describe()} ({sidecar_path(checkpoint).name})"
    return None, ("disc scale: unknown for this model (no --disc-scale, no disc_scale in its "
                  "manifest, no .scale.json beside its checkpoint); images are segmented "
                  "at the scale they come in")

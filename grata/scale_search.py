"""Find the optic disc in a crop of any scale, label-free, and re-crop it to the model's.

A source model segments the disc at the scale of its training crops (`grata.disc_scale`);
a crop from another clinic shows it smaller or larger and elsewhere. :func:`locate_disc`
asks the model itself where the disc is and how large, and returns a :class:`Placement`:
the square box (pixels of the image as given) that shows the disc at the model's size
near the middle. :func:`recrop` cuts that box (padded where it leaves the image) into the
model's input, :func:`paste_back` puts a prediction on it back into the image as given,
so every metric stays in that frame. :class:`StreamScale` is a stream's robust running
estimate (one camera has one scale).

The method, per image:

1. the image as given (one forward pass): the dominant predicted disc blob gives a first
   centre and diameter. When its size lies within the model's training spread
   (:data:`AS_GIVEN_TOLERANCE` beyond it) and it sits inside the crop, the placement is
   the identity (``as-given``): a stream whose scale already matches is not resampled;
2. a settled stream (:class:`StreamScale`) skips the search: the box is centred on that
   blob (where there is none, on the crop's brightest spot) with the stream's diameter
   (``stream``; no further pass: the prediction on the box is the check,
   :func:`prefer_scaled`);
3. otherwise the estimate is refined (``per-image``): a window centred on the estimate,
   sized so the disc would have the model's diameter, is predicted and measured again,
   until the measured size agrees with the model's (at most :data:`MAX_REFINE` passes).
   Where the image as given shows no plausible disc (the model misses a disc far from its
   scale), a few zooms are searched over the crop (:data:`SEARCH_ZOOMS`; zoom-outs for
   discs larger than the model's) and the most plausible window is refined;
4. a window is plausible when its disc is one dominant blob, of the model's diameter,
   placed like the training discs, not cut by the window's edge, predicted confidently
   (:func:`plausibility`); the final window's plausibility is the placement's
   ``confidence``;
5. unsure (confidence below :data:`MIN_CONFIDENCE`): the stream's diameter where the
   stream has one (``stream``), else the image as given (``fallback-none``, with the
   reason). A crop is never skipped for scale.

Coordinates are continuous pixel coordinates of the image as given (pixel column ``j``
spans ``[j, j + 1)``); a box ``(x0, y0, x1, y1)`` holds columns ``x0 .. x1 - 1`` and may
leave the image. ``predict(x)`` takes the model's input, float32 [3, S, S] in [0, 1], and
returns [2, S, S] sigmoid probabilities (or logits, with ``logits=True``): any engine.
Pure numpy, scipy and Pillow.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from PIL import Image
from scipy import ndimage

from grata.decode import photo_input
from grata.disc_scale import DiscScale, disc_geometry
from grata.errors import GrataError
from grata.metrics import probs_from_logits

HOWS = ("as-given", "per-image", "stream", "fallback-none")
PADDING = "edge"  # outside the image: edge pixels replicated (measured against black:
#                   BENCHMARKS.md, "Disc scale")
AS_GIVEN_TOLERANCE = 0.12  # log-size margin beyond the training 10-90 % range
AS_GIVEN_OFFSET = 0.25     # disc centre this far from the middle (of the side) is fine
MAX_REFINE = 2             # refinement passes after the first estimate
CONVERGED = 0.08           # |log(measured / model diameter)| at which refining stops
MIN_CONFIDENCE = 0.3       # below: the per-image estimate is unsure
SEARCH_ZOOMS = (1.6, 2.6, 0.7)  # image side / window side of the search (< 1: zoom out)
MAX_LOOKS = 16             # model passes per image at most (an image without a disc)
WORK_SIDES = 8             # images larger than this many model sides are searched on a
#                            box-reduced copy (the final box is in the image's pixels)
MIN_BOX = 8                # smallest box side, pixels


@dataclass(frozen=True)
class Placement:
    """Where the model should look: ``box`` (pixels of the image as given, square unless
    the identity), ``factor`` (image height / box side: > 1 magnifies, the disc was
    smaller than the model's), the disc's ``centre`` and ``diameter`` as estimated (pixels;
    None when not found), ``confidence`` (0-1), ``how`` (one of :data:`HOWS`),
    ``n_forward`` (model passes spent), ``reason`` (why not per-image, or ""),
    ``as_given`` (the model's probabilities [2, S, S] for the image as given, when the
    locator predicted it: the unscaled prediction, for a comparison), ``on_box`` (its
    probabilities on ``box``, when the locator predicted that already: the check needs
    no further pass), ``seen_at_scale`` (the box is centred on a disc the model saw whole
    and plausible at its own scale in the image as given: that look was the check)."""

    box: tuple[int, int, int, int]
    factor: float
    centre: tuple[float, float] | None
    diameter: float | None
    confidence: float
    how: str
    n_forward: int
    image_shape: tuple[int, int]
    reason: str = ""
    as_given: np.ndarray | None = field(default=None, repr=False, compare=False)
    on_box: np.ndarray | None = field(default=None, repr=False, compare=False)
    seen_at_scale: bool = field(default=False, compare=False)

    @property
    def identity(self) -> bool:
        return self.box == (0, 0, self.image_shape[1], self.image_shape[0])

    def record(self) -> dict:
        """JSON-safe summary for reports (rounded numbers; without ``as_given``)."""
        out = {k: v for k, v in asdict(self).items()
               if k not in ("as_given", "on_box", "seen_at_scale")}
        out["box"] = list(self.box)
        out["image_shape"] = list(self.image_shape)
        out["factor"] = round(self.factor, 4)
        out["confidence"] = round(self.confidence, 4)
        out["centre"] = None if self.centre is None else [round(v, 2) for v in self.centre]
        out["diameter"] = None if self.diameter is None else round(self.diameter, 2)
        return out


# ----------------------------------------------------------------------------- geometry

def as_photo(image) -> np.ndarray:
    """uint8 [H, W, 3] from an RGB photograph (uint8 [H, W, 3]) or a model-style float
    image [3, H, W] in [0, 1]."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[2] != 3 and a.dtype != np.uint8:
        a = np.clip(np.rint(a.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or min(a.shape[:2]) < 1:
        raise GrataError(f"expected an H x W x 3 uint8 image or a [3, H, W] float image, "
                         f"got shape {a.shape} {a.dtype}")
    return a


def square_box(cx: float, cy: float, side: float) -> tuple[int, int, int, int]:
    """The integer square box of side ``round(side)`` (at least MIN_BOX) whose centre
    is nearest to ``(cx, cy)``."""
    s = max(MIN_BOX, int(round(side)))
    x0 = int(math.floor(cx - s / 2 + 0.5))
    y0 = int(math.floor(cy - s / 2 + 0.5))
    return x0, y0, x0 + s, y0 + s


def cut(image: np.ndarray, box, padding: str = PADDING) -> np.ndarray:
    """The box's pixels of an image [H, W, ...]; where the box leaves the image the edge
    pixels are replicated (``edge``) or black (``black``)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    a = np.asarray(image)
    H, W = a.shape[:2]
    if x1 <= x0 or y1 <= y0:
        raise GrataError(f"empty box {tuple(box)}")
    if x1 <= 0 or y1 <= 0 or x0 >= W or y0 >= H:
        inside = a[:1, :1] if padding == "edge" else np.zeros_like(a[:1, :1])
        return np.broadcast_to(inside, (y1 - y0, x1 - x0) + a.shape[2:]).copy()
    sub = a[max(y0, 0):min(y1, H), max(x0, 0):min(x1, W)]
    pad = ((max(0, -y0), max(0, y1 - H)), (max(0, -x0), max(0, x1 - W))) + \
        ((0, 0),) * (a.ndim - 2)
    if not any(p for pair in pad for p in pair):
        return sub
    if padding == "edge":
        return np.pad(sub, pad, mode="edge")
    if padding == "black":
        return np.pad(sub, pad)
    raise GrataError(f"padding must be 'edge' or 'black', not {padding!r}")


def recrop(image, box, size: int, padding: str = PADDING) -> np.ndarray:
    """The model's input for a box of the image: float32 [3, S, S] in [0, 1], cut (padded
    outside the image), resized bilinearly and min-max scaled as a crop file is read; the
    box (0, 0, W, H) gives exactly the image as given."""
    return photo_input(cut(as_photo(image), box, padding), size)


def paste_back(pred, box, image_shape) -> np.ndarray:
    """A prediction on a box ([2, S, S] probabilities or bool) in the frame of the image
    as given: bool [2, H, W], resized bilinearly to the box (probabilities, then >= 0.5),
    what lies outside the image dropped, background elsewhere."""
    p = np.asarray(pred)
    if p.ndim != 3 or p.shape[0] != 2:
        raise GrataError(f"expected a [2, S, S] prediction, got shape {p.shape}")
    x0, y0, x1, y1 = (int(v) for v in box)
    H, W = int(image_shape[0]), int(image_shape[1])
    out = np.zeros((2, H, W), bool)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
    if sx1 <= sx0 or sy1 <= sy0:
        return out
    for c in range(2):
        ch = p[c].astype(np.float32)
        if ch.shape != (y1 - y0, x1 - x0):
            ch = np.asarray(Image.fromarray(ch, "F").resize((x1 - x0, y1 - y0),
                                                            Image.BILINEAR))
        out[c, sy0:sy1, sx0:sx1] = ch[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] >= 0.5
    return out


# ----------------------------------------------------------------------------- one window

@dataclass(frozen=True)
class Blob:
    """The dominant predicted disc of one window, in window pixels: centre, vertical
    diameter, its share of all predicted disc mass, whether the window's edge cuts it,
    its mean probability."""

    cx: float
    cy: float
    d: float
    share: float
    cut: bool
    confidence: float
    fill: float


def dominant_blob(disc_prob) -> Blob | None:
    """The predicted disc component with the most probability mass (>= 0.5), or None."""
    p = np.asarray(disc_prob, np.float32)
    m = p >= 0.5
    lab, n = ndimage.label(m)
    if n == 0:
        return None
    mass = np.asarray(ndimage.sum(p, lab, index=np.arange(1, n + 1)))
    i = int(np.argmax(mass))
    comp = lab == i + 1
    cx, cy, d = disc_geometry(comp)
    cut_ = bool(comp[0].any() or comp[-1].any() or comp[:, 0].any() or comp[:, -1].any())
    fill = float(comp.sum()) / (math.pi / 4 * d * d)
    return Blob(cx, cy, d, float(mass[i] / mass.sum()), cut_, float(p[comp].mean()), fill)


def plausibility(blob: Blob | None, size: int, scale: DiscScale) -> float:
    """How much a window's dominant blob looks like a training disc (0-1): its diameter
    against the model's (log-normal, the training spread widened), its distance from the
    middle beyond the training discs', its dominance, roundness, confidence, and whether
    the window's edge cuts it."""
    if blob is None:
        return 0.0
    sigma = max(0.12, math.log(scale.high / scale.low) / 2.56 * 1.5)
    size_term = math.exp(-0.5 * (math.log(blob.d / size / scale.diameter) / sigma) ** 2)
    off = math.hypot(blob.cx - size / 2, blob.cy - size / 2) / size
    place = math.exp(-0.5 * (max(0.0, off - max(scale.offset_high, 0.1)) / 0.1) ** 2)
    shape = min(1.0, blob.fill / 0.6)
    sure = min(1.0, max(0.0, (blob.confidence - 0.5) / 0.3))
    return float(size_term * place * blob.share * shape * sure * (0.4 if blob.cut else 1.0))


@dataclass
class _Seen:
    box: tuple[int, int, int, int]
    blob: Blob | None
    score: float
    est: tuple[float, float, float] | None  # (cx, cy, d) in image pixels
    pred: np.ndarray                          # the probabilities [2, S, S]


def _look(predict, logits, work, box, size, scale, factor) -> _Seen:
    """One window: predict it, measure its blob, map the blob to image pixels."""
    p = np.asarray(predict(recrop(work, box, size)), np.float32)
    if p.ndim == 4 and p.shape[0] == 1:
        p = p[0]
    if p.shape != (2, size, size):
        raise GrataError(f"predict returned shape {p.shape}, expected [2, {size}, {size}]")
    if logits:
        p = probs_from_logits(p)
    b = dominant_blob(p[0])
    est = None
    if b is not None:
        x0, y0, x1, y1 = box
        sx, sy = (x1 - x0) / size * factor, (y1 - y0) / size * factor
        est = (x0 * factor + b.cx * sx, y0 * factor + b.cy * sy, b.d * sy)
    return _Seen(box, b, plausibility(b, size, scale), est, p)


# ----------------------------------------------------------------------------- the stream

@dataclass
class StreamScale:
    """One stream's running estimate of the disc's diameter as a fraction of the image's
    height: the median of the last ``window`` accepted per-image estimates. Once there are
    ``settle`` of them, an estimate more than ``outlier`` times away from the median is
    rejected, unless ``switch`` rejected ones in a row agree with each other (the camera
    changed: the estimate restarts from them). ``reset()`` with the stream."""

    window: int = 5
    settle: int = 3
    outlier: float = 1.5
    switch: int = 3
    accepted: deque = field(default_factory=deque)
    rejected: list = field(default_factory=list)
    n_seen: int = 0

    def rescaled(self, factor: float) -> StreamScale:
        """A copy whose estimates are in another unit (each times ``factor``): a whole
        photograph's stream kept in FOV diameters, read in its window's side."""
        s = StreamScale(self.window, self.settle, self.outlier, self.switch,
                        n_seen=self.n_seen)
        s.accepted = deque((v * factor for v in self.accepted), maxlen=self.window)
        s.rejected = [v * factor for v in self.rejected]
        return s

    def reset(self) -> None:
        self.accepted.clear()
        self.rejected.clear()
        self.n_seen = 0

    @property
    def settled(self) -> bool:
        return len(self.accepted) >= self.settle

    def estimate(self) -> float | None:
        """The median of the accepted estimates; None before the first."""
        return float(np.median(self.accepted)) if self.accepted else None

    def update(self, rel: float) -> bool:
        """Offer one per-image estimate (disc diameter / image height); True when
        accepted."""
        rel = float(rel)
        if not (math.isfinite(rel) and rel > 0):
            return False
        self.n_seen += 1
        med = self.estimate()
        if self.settled and abs(math.log(rel / med)) > math.log(self.outlier):
            self.rejected.append(rel)
            recent = self.rejected[-self.switch:]
            if len(recent) == self.switch and \
                    max(recent) / min(recent) <= self.outlier:  # a new scale, consistently
                self.accepted = deque(recent, maxlen=self.window)
                self.rejected.clear()
                return True
            return False
        self.rejected.clear()
        self.accepted = deque([*self.accepted, rel], maxlen=self.window)
        return True

    def observe(self, placement: Placement, crop_pred=None) -> bool:
        """Update from one image: the disc measured on the prediction for the placement's
        box (``crop_pred`` [2, S, S], the image's final prediction, costs no pass), else the
        placement's own estimate when it was measured at the model's scale. Only a
        plausible, uncut disc counts. True when an estimate was accepted."""
        H = placement.image_shape[0]
        if crop_pred is not None:
            p = np.asarray(crop_pred, np.float32)
            b = dominant_blob(p[0])
            if b is None or b.cut or b.share < 0.8:
                return False
            x0, y0, x1, y1 = placement.box
            return self.update(b.d * (y1 - y0) / p.shape[-2] / H)
        if placement.how in ("as-given", "per-image") and placement.diameter \
                and placement.confidence >= MIN_CONFIDENCE:
            return self.update(placement.diameter / H)
        return False

    def state(self) -> dict:
        """JSON-safe state (with the settings), for `load_state`."""
        return {"window": self.window, "settle": self.settle, "outlier": self.outlier,
                "switch": self.switch, "accepted": [float(v) for v in self.accepted],
                "rejected": [float(v) for v in self.rejected], "n_seen": self.n_seen}

    @classmethod
    def from_state(cls, state: dict) -> StreamScale:
        """The stream estimate `state()` saved; a malformed state is a `GrataError`."""
        try:
            s = cls(window=int(state["window"]), settle=int(state["settle"]),
                    outlier=float(state["outlier"]), switch=int(state["switch"]),
                    n_seen=int(state["n_seen"]))
            vals = [float(v) for v in state["accepted"]]
            s.rejected = [float(v) for v in state["rejected"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise GrataError(f"stream scale state is malformed ({type(exc).__name__})") \
                from None
        if not all(math.isfinite(v) and v > 0 for v in vals + s.rejected) or s.window < 1:
            raise GrataError("stream scale state holds invalid values")
        s.accepted = deque(vals[-s.window:], maxlen=s.window)
        return s


# ----------------------------------------------------------------------------- the locator

def _in_band(rel: float, scale: DiscScale, margin: float = 1) -> bool:
    """A disc of ``rel`` times the side is within the model's training spread (widened
    by ``margin`` times AS_GIVEN_TOLERANCE)."""
    widen = math.exp(margin * AS_GIVEN_TOLERANCE)
    return scale.low / widen <= rel <= scale.high * widen


def _fits_as_given(seen: _Seen, size: int, scale: DiscScale) -> bool:
    """The image as given already shows a plausible, uncut disc at the model's scale,
    near enough to the middle."""
    b = seen.blob
    if b is None or b.cut or seen.score < MIN_CONFIDENCE:
        return False
    off = math.hypot(b.cx - size / 2, b.cy - size / 2) / size
    return _in_band(b.d / size, scale) and off <= AS_GIVEN_OFFSET


def _work_copy(a: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """The image, box-reduced by an integer factor when larger than WORK_SIDES model
    sides (the search cost does not grow with the camera's resolution)."""
    k = max(1, int(math.ceil(max(a.shape[:2]) / (WORK_SIDES * size))))
    if k == 1:
        return a, 1
    return np.asarray(Image.fromarray(a).reduce(k)), k


def locate_disc(image, predict, scale: DiscScale, size: int, stream: StreamScale | None = None,
                prior: tuple[float, float, float] | None = None,
                logits: bool = False) -> Placement:
    """Where the model should look in ``image`` (an RGB crop of any scale: uint8
    [H, W, 3] or float [3, H, W] in [0, 1], at its own resolution) so the disc has the
    size and place of the model's training crops (see the module for the method).

    ``stream``: the stream's running estimate, read only (call ``stream.observe`` after
    the image). ``prior``: ``(cx, cy, d)`` in pixels from another localiser (a whole
    photograph's), checked with the model instead of the image as given. The model's
    prediction of the image as given, when made, is ``placement.as_given`` (of a reduced
    copy for an image over WORK_SIDES model sides). Never raises
    for what the image holds: no disc, a flat image, a huge one are placements with a
    reason."""
    a = as_photo(image)
    H, W = a.shape[:2]
    if int(a.max()) == int(a.min()):
        return Placement((0, 0, W, H), 1.0, None, None, 0.0, "fallback-none", 0, (H, W),
                         "flat image: nothing to locate")
    work, k = _work_copy(a, size)
    wh, ww = work.shape[:2]
    n = 0
    first: _Seen | None = None

    def look(box):
        nonlocal n
        n += 1
        return _look(predict, logits, work, box, size, scale, k)

    def window_for(est) -> tuple[int, int, int, int]:  # in work pixels
        return square_box(est[0] / k, est[1] / k, est[2] / k / scale.diameter)

    def done(how, est=None, conf=0.0, reason="", diameter=None) -> Placement:
        """The placement: the identity for as-given and fallback-none, else the box that
        shows the disc at ``est`` (diameter ``diameter`` when given) at the model's."""
        given_pred = None if first is None else first.pred
        if how in ("as-given", "fallback-none") or est is None:
            return Placement((0, 0, W, H), 1.0, None if est is None else (est[0], est[1]),
                             None if est is None else est[2], conf, how, n, (H, W), reason,
                             given_pred)
        d = est[2] if diameter is None else diameter
        box = square_box(est[0], est[1], d / scale.diameter)
        return Placement(box, H / (box[3] - box[1]), (est[0], est[1]), d, conf, how, n,
                         (H, W), reason, given_pred)

    seen: list[_Seen] = []
    est = None
    looked_around_spot = False
    if prior is None and stream is not None and stream.settled \
            and not _in_band(stream.estimate(), scale, margin=2):
        looked_around_spot = True
        # A settled stream clearly at another scale than the model's (beyond twice the
        # as-given margin: a stream near the band keeps the comparison with the crop as
        # given, so a matching camera loses nothing): one pass, on the box of the
        # stream's diameter around the brightest spot, when that box shows a plausible,
        # uncut disc near its middle; otherwise the full path below.
        d = stream.estimate() * H
        quick = _stream_look(look, work, k, d, size, scale)
        if quick is not None:
            box = tuple(int(round(v * k)) for v in quick.box) if k > 1 else quick.box
            return Placement(box, H / (box[3] - box[1]), quick.est[:2], d, quick.score,
                             "stream", n, (H, W), "", None, quick.pred)
    if prior is None:
        first = look((0, 0, ww, wh))
        seen.append(first)
        if _fits_as_given(first, size, scale):
            return done("as-given", first.est, first.score)
        if first.blob is not None and first.blob.share >= 0.5:
            est = first.est
    else:
        est = tuple(float(v) for v in prior)

    if stream is not None and stream.settled:
        # One camera, one scale: the stream's diameter, centred on this image's disc (or,
        # where the model missed it as given, on the brightest spot); no further pass:
        # the prediction on that box tells (`prefer_scaled`).
        d = stream.estimate() * H
        if est is None:
            spots = [] if looked_around_spot else bright_spots(work)  # (that box: no disc)
            if spots:
                est = (spots[0][0] * k, spots[0][1] * k, d)
                return done("stream", est, 0.0, "centred on the brightest spot", diameter=d)
        else:
            if prior is None and _matches(d / H, est, W, H, scale):
                return done("as-given", est, first.score)
            seen = _plausible_but_placed(first, size, scale) if prior is None else 0.0
            if seen >= MIN_CONFIDENCE:
                # Seen whole and plausible at the model's scale, only off centre: centred on
                # it at its own size; that look was the check (one pass in all).
                return replace(done("per-image", est, seen), seen_at_scale=True)
            return done("stream", est, first.score if first else 0.0, diameter=d)

    # Refine the estimate at the model's scale; search the zooms when that finds no
    # plausible disc (the model misses a disc far from its scale).
    seen += _refine(look, window_for, est, size, scale, seen)
    if max((s.score for s in seen), default=0.0) < MIN_CONFIDENCE:
        found = _search(look, work, size, seen)
        seen += found
        best = max(found, key=lambda s: s.score) if found else None
        if best is not None and best.est is not None:
            seen += _refine(look, window_for, best.est, size, scale, seen)
    if not seen:
        return done("fallback-none", reason="no window could be looked at")
    best = max(seen, key=lambda s: s.score)
    if best.score >= MIN_CONFIDENCE and best.est is not None:
        if best is first:  # the image as given was the best view
            return done("as-given", best.est, best.score)
        return done("per-image", best.est, best.score)
    if stream is not None and stream.estimate() is not None and best.est is not None:
        return done("stream", best.est, best.score, "per-image estimate unsure",
                    diameter=stream.estimate() * H)
    reason = ("no disc found at any scale" if best.est is None
              else f"no plausible disc (best plausibility {best.score:.2f})")
    return done("fallback-none", conf=best.score, reason=reason)


def _plausible_but_placed(seen: _Seen, size: int, scale: DiscScale) -> float:
    """The plausibility of a window's disc as if it sat in the middle (0 when it is cut by
    the window or outside the model's size band): a disc at the model's scale that is
    only off centre."""
    b = seen.blob
    if b is None or b.cut or not _in_band(b.d / size, scale):
        return 0.0
    return plausibility(replace(b, cx=size / 2, cy=size / 2), size, scale)


def _stream_look(look, work: np.ndarray, k: int, d: float, size: int, scale: DiscScale
                 ) -> _Seen | None:
    """The settled stream's one pass: the box of diameter ``d`` (image pixels) around
    the brightest spot, kept when it shows a plausible, uncut disc near its middle."""
    spots = bright_spots(work)
    if not spots:
        return None
    seen = look(square_box(spots[0][0], spots[0][1], d / k / scale.diameter))
    b = seen.blob
    if b is None or b.cut or seen.score < MIN_CONFIDENCE:
        return None
    if math.hypot(b.cx - size / 2, b.cy - size / 2) / size > AS_GIVEN_OFFSET:
        return None
    return seen


def prefer_scaled(placement: Placement, crop_pred, scale: DiscScale) -> bool:
    """Keep the prediction on the placement's box (``crop_pred`` [2, S, S] probabilities)
    rather than the image as given's (``placement.as_given``)? Yes unless the one as given
    shows the more plausible disc (each judged in its own window, `plausibility`): a box
    that missed the disc never replaces a prediction that found it."""
    if placement.identity or placement.as_given is None:
        return True
    p = np.asarray(crop_pred, np.float32)
    size = p.shape[-1]
    scaled = plausibility(dominant_blob(p[0]), size, scale)
    given = plausibility(dominant_blob(placement.as_given[0]), size, scale)
    return scaled >= given


def _matches(rel: float, est, W: int, H: int, scale: DiscScale) -> bool:
    """A disc of ``rel`` times the image height, centred at ``est``: already at the
    model's scale and place?"""
    off = math.hypot(est[0] - W / 2, est[1] - H / 2) / max(H, W)
    return _in_band(rel, scale) and off <= AS_GIVEN_OFFSET


def _refine(look, window_for, est, size: int, scale: DiscScale, seen: list) -> list:
    """Windows sized and centred so the estimated disc has the model's diameter, each
    re-measuring the estimate, until the measured size agrees with the model's."""
    out = []
    for _ in range(MAX_REFINE + 1):
        if est is None:
            break
        box = window_for(est)
        if any(s.box == box for s in seen + out):
            break
        s = look(box)
        out.append(s)
        if s.est is None:
            break
        est = s.est
        if abs(math.log(s.blob.d / size / scale.diameter)) < CONVERGED:
            break
    return out


def _search(look, work: np.ndarray, size: int, seen: list) -> list:
    """Zoomed windows over the crop, the brightest spots first (the disc is the crop's
    brightest blob), then a grid; stops at the first plausible window, or when the
    image's passes (MAX_LOOKS, less room to refine) are spent."""
    wh, ww = work.shape[:2]
    short = min(wh, ww)
    spots = bright_spots(work)
    order = [(cx, cy, short / z) for z in SEARCH_ZOOMS if z > 1 for cx, cy in spots]
    order += [(ww / 2, wh / 2, short / z) for z in SEARCH_ZOOMS if z <= 1]
    order += [(cx, cy, short / z) for z in SEARCH_ZOOMS if z > 1
              for cx, cy in _grid(ww, wh, short / z)]
    out: list[_Seen] = []
    budget = MAX_LOOKS - MAX_REFINE - 1 - len(seen)  # keep room to refine what is found
    for cx, cy, side in order:
        box = square_box(cx, cy, side)
        if any(s.box == box for s in seen + out):
            continue
        if len(out) >= budget:
            break
        out.append(look(box))
        if out[-1].score >= MIN_CONFIDENCE:
            break
    return out


def bright_spots(image: np.ndarray, n: int = 2) -> list[tuple[float, float]]:
    """Centres (pixels) of the ``n`` strongest bright blobs of a crop: luminance on a
    thumbnail, a disc-sized blur minus a wide background, inside the non-black part
    (a field of view's edge may lie in the crop)."""
    a = np.asarray(image)
    H, W = a.shape[:2]
    k = max(1, int(max(H, W) // 96))
    small = np.asarray(Image.fromarray(a).reduce(k), np.float32) if k > 1 else \
        a.astype(np.float32)
    lum = small @ np.array([0.3, 0.6, 0.1], np.float32)
    h, w = lum.shape
    inside = lum > 0.15 * max(float(lum.max()), 1.0)
    side = min(h, w)
    blob = ndimage.gaussian_filter(lum * inside, 0.03 * side) / np.maximum(
        ndimage.gaussian_filter(inside.astype(np.float32), 0.03 * side), 1e-3)
    back = ndimage.gaussian_filter(lum * inside, 0.2 * side) / np.maximum(
        ndimage.gaussian_filter(inside.astype(np.float32), 0.2 * side), 1e-3)
    resp = np.where(ndimage.binary_erosion(inside, iterations=2), blob - back, -np.inf)
    peaks = (resp == ndimage.maximum_filter(resp, size=max(3, int(0.15 * side) | 1))) \
        & np.isfinite(resp)
    ys, xs = np.nonzero(peaks)
    order = np.argsort(resp[ys, xs])[::-1][:n]
    sx, sy = W / w, H / h
    return [((float(xs[i]) + 0.5) * sx, (float(ys[i]) + 0.5) * sy) for i in order]


def _grid(w: int, h: int, side: float) -> list[tuple[float, float]]:
    """Window centres covering a w x h image with windows of ``side`` (half overlap);
    a window larger than the image is centred."""
    def axis(length):
        if side >= length:
            return [length / 2]
        k = int(math.ceil((length - side) / (side / 2))) + 1
        return list(np.linspace(side / 2, length - side / 2, k))
    return [(x, y) for y in axis(h) for x in axis(w)]

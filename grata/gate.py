"""A label-free safety gate: keep the adapted prediction only when it does not look worse
than the source model's.

Per image the gate scores two predictions of the same image, the adapted one (the
method's theta and statistics rule) and the source one (theta0 with the stored
statistics: what the ``source`` method predicts), from the image alone:

- plausibility (`plausibility`): a disc is present, is one connected component, fills a
  plausible fraction of the crop, is roughly elliptical (its area against the ellipse of
  its second moments, its aspect ratio), the cup lies inside the disc and the vertical
  cup-to-disc ratio is at most 1. Each failed check is a named reason.
- agreement (`agreement`): Dice (`grata.metrics.dice_ratio`; masks where the logit is
  >= 0, `grata.metrics.binarize`) between the prediction and the predictions of flipped
  views of the image mapped back (the GraTa teacher views; a model that is sure of a
  structure finds it in every view). 1 when they agree exactly.
- entropy (`mean_entropy`): the mean binary entropy of the sigmoid maps, in [0, 1].

`decide` compares the two: fewer failed plausibility checks wins; on a tie the source
replaces the adapted prediction when it agrees better across the views by more than
`margin`, or when its entropy is below `entropy_ratio` times the adapted one's (an
adapted model that over-segments stays self-consistent, agreement being larger for
larger masks, but loses its confidence; measured in benchmarks/gate_accuracy.py). The per-stream part
(`Gate`): when the adapted prediction lost the comparison on at least `fallback_share`
of the last `window` images, the stream falls back to the source prediction for every
image until that share drops to `recover_share` (it keeps being compared meanwhile).

Not used: the distance of the image's BN statistics from the stored ones (early layers,
normalised by the stored deviation) was measured on the synthetic benchmark and does not
separate the targets where per-image statistics hurt from those where they help
(correlation 0.11 with the Dice gain of ``bn`` over ``source``), since the harm there comes
from crop content rather than from the camera's colour statistics.

Cost per image: one source forward pass, plus two per view (the adapted and the source
prediction of each view); the default one view (horizontal flip) makes three extra
forward passes. Torch-free (numpy and scipy); the runtime uses it as it is.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from grata import metrics
from grata.errors import GrataError

# view name -> (forward, inverse) on [..., H, W] arrays (inverse maps a prediction back)
VIEWS: dict[str, tuple[Callable, Callable]] = {
    "hflip": (lambda a: a[..., ::-1], lambda a: a[..., ::-1]),
    "vflip": (lambda a: a[..., ::-1, :], lambda a: a[..., ::-1, :]),
    "rot90": (lambda a: np.rot90(a, 1, axes=(-2, -1)), lambda a: np.rot90(a, -1, axes=(-2, -1))),
    "rot180": (lambda a: np.rot90(a, 2, axes=(-2, -1)), lambda a: np.rot90(a, 2, axes=(-2, -1))),
    "rot270": (lambda a: np.rot90(a, 3, axes=(-2, -1)), lambda a: np.rot90(a, 1, axes=(-2, -1))),
}


@dataclass(frozen=True)
class GateConfig:
    """The gate's settings (recorded in a run's config). `views`: names of `VIEWS` for
    the agreement score (none: entropy alone decides ties); `margin`: how much better the
    source's agreement must be to replace the adapted prediction; `entropy_ratio`: the
    source replaces it when its entropy is below this share of the adapted one's; `window`, `fallback_share`,
    `recover_share`: the per-stream rule; the plausibility bounds."""

    views: tuple[str, ...] = ("hflip",)
    margin: float = 0.02
    entropy_ratio: float = 0.75
    window: int = 8
    fallback_share: float = 0.75
    recover_share: float = 0.4
    min_disc_fraction: float = 0.01
    max_disc_fraction: float = 0.6
    min_ellipse_fill: float = 0.8
    max_aspect: float = 2.0
    min_cup_inside: float = 0.95
    min_component_share: float = 0.05

    def __post_init__(self):
        unknown = [v for v in self.views if v not in VIEWS]
        if unknown:
            raise GrataError(f"unknown gate view {unknown[0]!r}; choose from "
                             f"{', '.join(VIEWS)}")
        if not 0 < self.recover_share <= self.fallback_share <= 1 or self.window < 1:
            raise GrataError("gate: need window >= 1 and 0 < recover_share <= "
                             "fallback_share <= 1")

    @property
    def extra_forwards(self) -> int:
        """Forward passes the gate adds per image (source, and both models per view)."""
        return 1 + 2 * len(self.views)

    def as_json(self) -> dict:
        return {**asdict(self), "views": list(self.views),
                "extra_forwards_per_image": self.extra_forwards}


# -- scores on numpy masks and logits ------------------------------------------------------

def _masks(logits) -> np.ndarray:
    """[2, S, S] (or [1, 2, S, S]) logits -> bool masks (sigmoid >= 0.5, i.e. logit >= 0)."""
    a = np.asarray(logits)
    return metrics.binarize(a[0] if a.ndim == 4 else a, logits=True)


def mean_entropy(logits) -> float:
    """Mean binary entropy of the sigmoid maps, divided by log 2 (0 sure, 1 undecided)."""
    z = np.asarray(logits, dtype=np.float64)
    p = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
    q = np.clip(p, 1e-12, 1 - 1e-12)
    h = -(q * np.log(q) + (1 - q) * np.log(1 - q))
    return float(h.mean() / math.log(2))


def agreement(pred: np.ndarray, views: list[np.ndarray]) -> float:
    """Mean Dice (over channels and views) between a [2, S, S] bool prediction and the
    predictions of its views mapped back; 1 without views or when all agree exactly."""
    if not views:
        return 1.0
    return float(np.mean([metrics.dice_ratio(pred[c], v[c])
                          for v in views for c in range(pred.shape[0])]))


def _components(mask: np.ndarray) -> list[int]:
    from scipy import ndimage
    labels, n = ndimage.label(mask)
    return sorted(np.bincount(labels.ravel())[1:].tolist(), reverse=True) if n else []


def _extent(mask: np.ndarray) -> int:
    rows = np.flatnonzero(mask.any(axis=1))
    return int(rows[-1] - rows[0] + 1) if rows.size else 0


def plausibility(pred: np.ndarray, cfg: GateConfig | None = None) -> list[str]:
    """The failed shape checks of a [2, S, S] bool prediction (disc, cup); [] is plausible.

    Checks: a disc present, one connected disc component (others below
    `min_component_share` of the largest are ignored), disc area within
    [min_disc_fraction, max_disc_fraction] of the crop, roughly elliptical (area at least
    `min_ellipse_fill` of the ellipse with the same second moments; aspect ratio at most
    `max_aspect`), the cup at least `min_cup_inside` inside the disc, vCDR <= 1."""
    cfg = cfg or GateConfig()
    disc, cup = np.asarray(pred[0], bool), np.asarray(pred[1], bool)
    if not disc.any():
        return ["no disc"]
    fails = []
    comps = _components(disc)
    if sum(c >= cfg.min_component_share * comps[0] for c in comps) > 1:
        fails.append("disc in several pieces")
    frac = disc.mean()
    if not cfg.min_disc_fraction <= frac <= cfg.max_disc_fraction:
        fails.append(f"disc area {frac:.3f} of the crop")
    yy, xx = np.nonzero(disc)
    if yy.size >= 3:
        cov = np.cov(np.stack([yy, xx]).astype(np.float64)) + np.eye(2) / 12  # pixel size
        ev = np.linalg.eigvalsh(cov)
        fill = yy.size / (4 * math.pi * math.sqrt(max(ev[0] * ev[1], 1e-12)))
        if fill < cfg.min_ellipse_fill:
            fails.append(f"disc not elliptical (fill {fill:.2f})")
        if math.sqrt(ev[1] / max(ev[0], 1e-12)) > cfg.max_aspect:
            fails.append("disc too elongated")
    if cup.any():
        inside = np.logical_and(cup, disc).sum() / cup.sum()
        if inside < cfg.min_cup_inside:
            fails.append(f"cup outside the disc ({1 - inside:.2f})")
        if _extent(cup) > _extent(disc):
            fails.append("vCDR above 1")
    return fails


@dataclass
class Scores:
    """One prediction's label-free scores."""

    fails: list[str]
    agreement: float
    entropy: float

    def as_json(self) -> dict:
        return {"implausible": self.fails, "agreement": round(self.agreement, 6),
                "entropy": round(self.entropy, 6)}


def score(logits, view_logits: list, cfg: GateConfig | None = None) -> Scores:
    """Scores of a prediction ([1, 2, S, S] logits) given its views' logits, each already
    mapped back to the image's orientation."""
    cfg = cfg or GateConfig()
    pred = _masks(logits)
    return Scores(plausibility(pred, cfg), agreement(pred, [_masks(v) for v in view_logits]),
                  mean_entropy(logits))


def decide(adapted: Scores, source: Scores, margin: float = 0.02,
           entropy_ratio: float = 0.75, use_agreement: bool = True) -> tuple[str, str]:
    """("adapted" | "source", reason) for one image from both predictions' scores."""
    na, ns = len(adapted.fails), len(source.fails)
    if na > ns:
        return "source", "adapted implausible: " + "; ".join(adapted.fails)
    if ns > na:
        return "adapted", "source implausible: " + "; ".join(source.fails)
    if use_agreement and source.agreement > adapted.agreement + margin:
        return "source", "source agrees better across views"
    if source.entropy < entropy_ratio * adapted.entropy:
        return "source", "source much more confident"
    return "adapted", "adapted as consistent and confident"


# -- the gate over a stream ----------------------------------------------------------------

@dataclass
class Gate:
    """The per-image decision with its per-stream fallback (see the module docstring).
    `state()` / `load_state()` carry the window and the mode (checkpointed with theta)."""

    config: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.lost: deque = deque(maxlen=self.config.window)
        self.fallback = False

    def state(self) -> dict:
        return {"lost": [bool(v) for v in self.lost], "fallback": bool(self.fallback)}

    def load_state(self, state: dict) -> None:
        self.lost = deque((bool(v) for v in state.get("lost", [])), maxlen=self.config.window)
        self.fallback = bool(state.get("fallback", False))

    def judge(self, adapted: Scores, source: Scores) -> dict:
        """The decision of one image: per image (`decide`), then the stream rule."""
        cfg = self.config
        choice, reason = decide(adapted, source, cfg.margin, cfg.entropy_ratio,
                                bool(cfg.views))
        self.lost.append(choice == "source")
        share = sum(self.lost) / len(self.lost)
        full = len(self.lost) >= max(1, cfg.window // 2)
        if not self.fallback and full and share >= cfg.fallback_share:
            self.fallback = True
        elif self.fallback and share <= cfg.recover_share:
            self.fallback = False
        if self.fallback and choice == "adapted":
            reason = (f"stream fallback ({share:.2f} of the last {len(self.lost)} images "
                      f"lost); {reason}")
            choice = "source"
        return {"chosen": choice, "reason": reason, "stream_fallback": self.fallback,
                "lost_share": round(share, 4), "adapted": adapted.as_json(),
                "source": source.as_json()}


def view_logits(predict: Callable, x: np.ndarray, views) -> list[np.ndarray]:
    """Predictions of each view of x ([1, 3, S, S] host array) by `predict` (host array
    -> logits), mapped back to x's orientation."""
    out = []
    for name in views:
        fwd, inv = VIEWS[name]
        out.append(np.ascontiguousarray(inv(np.asarray(predict(
            np.ascontiguousarray(fwd(x)))))))
    return out


def source_logits(engine, x):
    """What the ``source`` method predicts for x: theta0 with the stored statistics (theta
    is restored afterwards)."""
    saved = engine.copy(engine.theta)
    engine.assign(engine.theta, engine.theta0)
    try:
        return engine.infer(x, norm="source")
    finally:
        engine.assign(engine.theta, saved)


def gated_predict(gate: Gate, x_host: np.ndarray, adapted: Callable, source: Callable,
                  adapted_logits=None):
    """Judge one image: `adapted` and `source` map a host [1, 3, S, S] image to host logits
    (`adapted_logits`: the adapted prediction of x when already made). Returns (chosen
    logits, adapted logits, source logits, decision); the decision's ``extra_forwards``
    counts the passes the gate added (the adapted prediction itself not included)."""
    views = gate.config.views
    la = np.asarray(adapted(x_host) if adapted_logits is None else adapted_logits)
    ls = np.asarray(source(x_host))
    sa = score(la, view_logits(adapted, x_host, views), gate.config)
    ss = score(ls, view_logits(source, x_host, views), gate.config)
    decision = gate.judge(sa, ss)
    decision["extra_forwards"] = gate.config.extra_forwards
    return (la if decision["chosen"] == "adapted" else ls), la, ls, decision


__all__ = ["VIEWS", "Gate", "GateConfig", "Scores", "agreement", "decide", "gated_predict",
           "mean_entropy", "plausibility", "score", "source_logits", "view_logits"]

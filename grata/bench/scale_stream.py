"""The scale stage's cost (`grata bench --stages scale`): streams of crops whose disc is
another size than the model's, each image located (`grata.scale_stage.ScaleLocator`, the
source model through the engine) and then run through the pipeline's step at the located
box, as `grata adapt --scale auto` runs it.

Per image: the seconds of the locate step and of the whole image, and the source-model
passes the locate step spent, counted by wrapping the model (the record's ``n_forward``
beside them), split by whether the stream's running estimate had settled before the image
(`grata.scale_search.StreamScale.settled`). ``extra``: passes beyond the one on the crop as
given (the image's own prediction in a run without the stage).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from grata.disc_scale import DiscScale
from grata.scale_stage import ScaleLocator
from grata.synth import DOMAINS, SOURCE_DOMAIN, render

FACTORS = (0.5, 1.2, 1.6)  # the streams' disc diameters over the model's training diameter
SPREAD = 0.05         # each eye's own size around its stream's: +-5 %


def scale_crops(scale: DiscScale, size: int, factor: float, n: int, seed: int = 0
                ) -> list[np.ndarray]:
    """`n` deterministic synthetic crops (uint8 [H, W, 3], the source's camera) whose disc
    is `factor` times the model's training diameter, up to a sixth of the crop off centre;
    drawn at side size / factor, so the disc has about the model's pixels."""
    d = factor * scale.diameter
    domain = replace(DOMAINS[SOURCE_DOMAIN], disc=(d * (1 - SPREAD), d * (1 + SPREAD)),
                     centre=(0.0, 1 / 6), rescale=True, macula=factor < 1, min_rim=1)
    side = max(32, int(round(size / factor)))
    return [render(np.random.default_rng([seed, int(round(factor * 1000)), i]), domain,
                   side)[0] for i in range(n)]


class Counted:
    """A predict function that counts its calls (the passes, not the record's word)."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray]):
        self.predict, self.calls = predict, 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.predict(x)


def run_stream(name: str, images, predict, scale: DiscScale, size: int,
               step: Callable[[np.ndarray], object], clock=time.perf_counter) -> list[dict]:
    """One stream through a fresh `ScaleLocator` over `predict` (the source model's logits
    of a model input): per image, the locate step, then `step(x)` on the model input it
    gave (the pipeline's step; it waits for the device). One row per image."""
    counted = Counted(predict)
    locator = ScaleLocator(size, scale, counted)
    rows = []
    for i, img in enumerate(images):
        settled, before = locator.stream.settled, counted.calls
        t0 = clock()
        x, placement = locator.locate(img, f"{name}-{i}")
        t1 = clock()
        step(x)
        t2 = clock()
        rec, passes = placement.record, counted.calls - before
        rows.append({"stream": name, "index": i, "settled": settled, "how": rec["how"],
                     "factor": rec["factor"], "n_forward": rec["n_forward"],
                     "passes": passes, "extra": max(0, passes - 1),
                     "locate_ms": (t1 - t0) * 1e3, "total_ms": (t2 - t0) * 1e3})
    return rows


def phase_summary(rows: list[dict]) -> dict | None:
    """Images, times (median / mean ms), locate time, passes and extra passes (mean / max)
    and the decisions of some rows; None for none."""
    if not rows:
        return None
    total = [r["total_ms"] for r in rows]
    passes = [r["passes"] for r in rows]
    extra = [r["extra"] for r in rows]
    return {"images": len(rows), "median_ms": float(np.median(total)),
            "mean_ms": float(np.mean(total)),
            "locate_median_ms": float(np.median([r["locate_ms"] for r in rows])),
            "passes_mean": float(np.mean(passes)), "passes_max": int(max(passes)),
            "extra_mean": float(np.mean(extra)), "extra_max": int(max(extra)),
            "how": dict(Counter(r["how"] for r in rows))}


def summarize_streams(rows: list[dict]) -> dict:
    """Per stream, and over all streams, the first images (the stream's estimate not yet
    settled) and the settled ones (`phase_summary` each)."""
    out = {"streams": {}}
    for name in dict.fromkeys(r["stream"] for r in rows):
        mine = [r for r in rows if r["stream"] == name]
        out["streams"][name] = {"first": phase_summary([r for r in mine if not r["settled"]]),
                                "settled": phase_summary([r for r in mine if r["settled"]])}
    out["first"] = phase_summary([r for r in rows if not r["settled"]])
    out["settled"] = phase_summary([r for r in rows if r["settled"]])
    return out


def measure_scale(predict, scale: DiscScale, size: int, new_step: Callable[[], Callable],
                  images: int, warmup: int, seed: int = 0) -> tuple[list[float], dict]:
    """The stage: `warmup` images of a stream of its own (then forgotten), then one stream
    of `images` crops per factor of FACTORS, each with a new locator and a new pipeline
    (`new_step()`: the step function of a fresh method). Returns the seconds of every
    timed image and {"factors", "images": the rows, and `summarize_streams`'s keys}."""
    if warmup:
        run_stream("warm-up", scale_crops(scale, size, FACTORS[-1], warmup, seed + 1),
                   predict, scale, size, new_step())
    rows = []
    for f in FACTORS:
        rows += run_stream(f"{f:g}x", scale_crops(scale, size, f, images, seed), predict,
                           scale, size, new_step())
    return [r["total_ms"] / 1e3 for r in rows], {"factors": list(FACTORS), "images": rows,
                                                 **summarize_streams(rows)}


__all__ = ["FACTORS", "Counted", "measure_scale", "phase_summary", "run_stream",
           "scale_crops", "summarize_streams"]

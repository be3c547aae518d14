"""The adaptation loop: stream target domains through methods and score every image.

Batch 1, one step per image, prediction after the step. Each method gets its own
engine; all methods advance over the same image together, so each image is read once.
Protocols: `domain` resets to the source theta at each new target domain (the
reference's protocol), `episodic` before every image, `continual` never.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from . import metrics
from .data import RoiOptions, Sample, Skipped, stream_domain
from .errors import GrataError
from .methods import METHODS, create
from .photo import scored

PROTOCOLS = ("domain", "episodic", "continual")


@dataclass
class Result:
    """The outcome of one method on one target domain."""

    method: str
    target: str
    images: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        agg = metrics.aggregate(self.images) if self.images else {
            "n_images": 0, "dice_od": math.nan, "dice_oc": math.nan, "dice_mean": math.nan,
            "vcdr_mae": math.nan}
        times = [r["time_s"] for r in self.images]
        return {"method": self.method, "target": self.target, **agg,
                "time_per_image_s": float(np.median(times)) if times else math.nan,
                "skipped": self.skipped, "events": self.events, "images": self.images}


def check_names(methods: Iterable[str], protocol: str) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise GrataError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if protocol not in PROTOCOLS:
        raise GrataError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


def run(engine_factory: Callable[[], object], data_root, targets: list[str], size: int,
        methods: list[str], protocol: str = "domain", seed: int = 0,
        on_image: Callable[[str, str, dict, np.ndarray, Sample], None] | None = None,
        on_domain: Callable[[list[Result]], None] | None = None,
        progress: bool = True, hyperparameters: dict | None = None,
        roi: RoiOptions | None = None) -> list[Result]:
    """Adapt every method over every target domain; return one Result per pair.

    `roi`: the images are whole photographs (see `grata.data.stream_domain`); each is
    scored on its pasted-back full-size mask, and `pred` given to `on_image` is that mask.

    `on_image(method, target, row, pred, sample)` sees every scored image (overlays);
    `on_domain(results)` is called after each domain with all results so far, so a
    caller can save partial reports and never lose finished work.
    """
    check_names(methods, protocol)
    hp = hyperparameters or {}
    runners = {m: create(m, engine_factory(), seed=seed, **hp.get(m, {})) for m in methods}
    results: list[Result] = []
    for d_index, target in enumerate(targets):
        if protocol == "domain" or d_index == 0:
            for r in runners.values():
                r.reset()
        per_method = {m: Result(m, target) for m in methods}
        stream = stream_domain(data_root, target, size, roi=roi)
        bar = _bar(stream, target, progress)
        index = 0
        for item in bar:
            if isinstance(item, Skipped):
                for res in per_method.values():
                    res.skipped.append({"file": item.name, "reason": item.reason})
                continue
            index += 1
            for m, method in runners.items():
                if protocol == "episodic":
                    method.reset()
                row, pred = _score(method, item, index)
                per_method[m].images.append(row)
                if on_image is not None:
                    on_image(m, target, row, pred, item)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix({m: f"{np.mean([r['dice_mean'] for r in res.images]):.1f}"
                                 for m, res in per_method.items()}, refresh=False)
        for m, method in runners.items():
            per_method[m].events = [dict(e, target=target) for e in method.events]
            method.events.clear()
        results.extend(per_method.values())
        if on_domain is not None:
            on_domain(results)
    return results


def _score(method, sample: Sample, index: int) -> tuple[dict, np.ndarray]:
    engine = method.engine
    start = time.perf_counter()
    x = engine.to_input(sample.image)
    logits = engine.to_numpy(method.adapt(x, image=sample.image))[0]
    elapsed = time.perf_counter() - start
    pred = metrics.binarize(metrics.probs_from_logits(logits))
    pred, target, extra = scored(pred, sample)  # a whole photograph: its pasted-back mask
    row = {"index": index, "file": sample.name, **metrics.image_metrics(pred, target),
           "time_s": elapsed, **{k: float(v) for k, v in method.last.items()}, **extra}
    return row, pred


def _bar(stream, target: str, progress: bool):
    if not progress:
        return stream
    from tqdm import tqdm
    return tqdm(stream, desc=f"{target:>12}", unit="img", leave=True, dynamic_ncols=True)

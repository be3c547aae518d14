"""The adaptation loop: stream target domains through methods and score every image.

Batch 1, one step per image, prediction after the step. Each method gets its own
engine; all methods advance over the same image together, so each image is read once.
Protocols: `domain` resets to the source theta at each new target domain (the
reference's protocol), `episodic` before every image, `continual` never.

Methods are specs (`grata.specs`): ``grata`` (under the run's `norm`), ``grata@mix:0.2``,
``bn@sample+gate`` (the safety gate, `grata.gate`, chooses per image between the adapted
and the source prediction). Results are keyed by the spec's key.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from grata import metrics
from grata.data import RoiOptions, Sample, Skipped, stream_domain
from grata.errors import GrataError
from grata.methods import create
from grata.specs import RunSpec, parse_specs
from grata.photo import scored

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


def check_names(methods: Iterable[str], protocol: str, norm="sample") -> list[RunSpec]:
    """The parsed method specs of a run (a bad one, or a bad protocol, is a GrataError)."""
    specs = parse_specs(methods, norm)
    if protocol not in PROTOCOLS:
        raise GrataError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    return specs


class Runner:
    """One spec's method (and gate) over its own engine."""

    def __init__(self, spec: RunSpec, engine, seed: int, hyperparameters: dict,
                 gate_config=None):
        self.spec = spec
        self.method = create(spec.method, engine, norm=spec.norm, seed=seed,
                             **hyperparameters)
        self.gate = None
        self.pair = None
        if spec.gate:
            from grata.gate import Gate, GateConfig
            self.gate = Gate(gate_config or GateConfig())

    @property
    def engine(self):
        return self.method.engine

    @property
    def events(self) -> list[dict]:
        return self.method.events

    @property
    def last(self) -> dict:
        return self.method.last

    def reset(self) -> None:
        self.method.reset()
        if self.gate is not None:
            self.gate.reset()

    def adapt(self, x, image: np.ndarray) -> tuple[np.ndarray, dict]:
        """One step on x, then the host logits [2, S, S] of the prediction served (the
        gate's choice when gated) and the gate's decision ({} without a gate)."""
        m, e = self.method, self.engine
        if self.gate is None:
            return e.to_numpy(m.adapt(x, image=image))[0], {}
        from grata.gate import gated_predict, source_logits
        m.update(x, image=image)
        logits = e.infer(x, norm=m.norm)
        # the gate's view passes overwrite the image statistics a stream rule moves to
        img_stats = e.copy(e.img_stats) if m.norm.kind == "ema" else None
        chosen, adapted, source, decision = gated_predict(
            self.gate, e.to_numpy(x),
            lambda xh: e.to_numpy(e.infer(e.to_input(xh), norm=m.norm)),
            lambda xh: e.to_numpy(source_logits(e, e.to_input(xh))),
            adapted_logits=e.to_numpy(logits))
        if img_stats is not None:
            e.assign(e.img_stats, img_stats)
            m.update_stream()
        self.pair = (adapted[0], source[0])  # both candidates, for measurements
        return chosen[0], decision


def run(engine_factory: Callable[[], object], data_root, targets: list[str], size: int,
        methods: list[str], protocol: str = "domain", seed: int = 0,
        on_image: Callable[[str, str, dict, np.ndarray, Sample], None] | None = None,
        on_domain: Callable[[list[Result]], None] | None = None,
        progress: bool = True, hyperparameters: dict | None = None, norm="sample",
        gate_config=None, roi: RoiOptions | None = None) -> list[Result]:
    """Adapt every method spec over every target domain; return one Result per pair.

    `methods` are specs (``grata``, ``grata@mix:0.2``, ``bn+gate``); a plain name runs
    under `norm`. `hyperparameters` are keyed by spec key or method name (the key wins).
    `roi`: the images are whole photographs (see `grata.data.stream_domain`); each is
    scored on its pasted-back full-size mask, and `pred` given to `on_image` is that mask.
    `on_image(key, target, row, pred, sample)` sees every scored image (overlays);
    `on_domain(results)` is called after each domain with all results so far, so a
    caller can save partial reports and never lose finished work.
    """
    specs = check_names(methods, protocol, norm)
    hp = hyperparameters or {}
    runners = {s.key: Runner(s, engine_factory(), seed, hp.get(s.key, hp.get(s.method, {})),
                             gate_config) for s in specs}
    methods = list(runners)
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


def _score(runner: Runner, sample: Sample, index: int) -> tuple[dict, np.ndarray]:
    engine = runner.engine
    start = time.perf_counter()
    x = engine.to_input(sample.image)
    logits, decision = runner.adapt(x, sample.image)
    elapsed = time.perf_counter() - start
    pred = metrics.binarize(metrics.probs_from_logits(logits))
    pred, target, extra = scored(pred, sample)  # a whole photograph: its pasted-back mask
    row = {"index": index, "file": sample.name, **metrics.image_metrics(pred, target),
           "time_s": elapsed, **{k: float(v) for k, v in runner.last.items()}, **extra}
    if decision:
        row.update({"gate": decision["chosen"], "gate_reason": decision["reason"],
                    "gate_fallback": decision["stream_fallback"]})
    return row, pred


def _bar(stream, target: str, progress: bool):
    if not progress:
        return stream
    from tqdm import tqdm
    return tqdm(stream, desc=f"{target:>12}", unit="img", leave=True, dynamic_ncols=True)

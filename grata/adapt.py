"""The adaptation loop: stream target domains through methods and score every image.

Batch 1, one step per image, prediction after the step. Each method gets its own
engine and its own per-image pipeline (`grata.pipeline.ImagePipeline`: adapt, predict,
gate, stream statistics, paste back); all methods advance over the same image together,
so each image is read once. The record step is here: each image scored into a report row.
Protocols: `domain` resets to the source theta at each new target domain (the
reference's protocol), `episodic` before every image, `continual` never.

Methods are specs (`grata.specs`): ``grata`` (under the run's `norm`), ``grata@mix:0.2``,
``bn@sample+gate`` (the safety gate, `grata.gate`, chooses per image between the adapted
and the source prediction). Results are keyed by the spec's key.

With a disc scale (``run(..., scale=)``) the crops are read at their own resolution and
each image is located once, for every method (`grata.scale_stage.ScaleLocator`, or for
whole photographs `grata.photo_scale.PhotoScaleLocator`, on an
engine of its own: the source model decides, so the box does not depend on the method;
its running estimate is reset with the methods); each method's pipeline adapts and
predicts on the re-crop, and the prediction is pasted back and scored in the crop's own
frame.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from grata import metrics
from grata.disc_scale import DiscScale
from grata.domains import RoiOptions, Sample, Skipped, stream_domain
from grata.errors import DataError, GrataError
from grata.gate import Gate, GateConfig
from grata.methods import create
from grata.photo_scale import PhotoScaleLocator
from grata.picture import Picture, PictureReader, picture_of
from grata.pipeline import ImagePipeline, Outcome
from grata.scale_stage import ScaleLocator, source_predict
from grata.specs import RunSpec, parse_specs
from tqdm import tqdm

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
    """One spec's method (and gate) over its own engine, through the per-image pipeline
    (the locate step is the run's: `locate_once`)."""

    def __init__(self, spec: RunSpec, engine, seed: int, hyperparameters: dict,
                 gate_config=None):
        self.spec = spec
        self.method = create(spec.method, engine, norm=spec.norm, seed=seed,
                             **hyperparameters)
        self.gate = Gate(gate_config or GateConfig()) if spec.gate else None
        self.pipeline = ImagePipeline(self.method, gate=self.gate)
        self.pair = None

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
        self.pipeline.reset()

    def adapt(self, x, image: np.ndarray) -> tuple[np.ndarray, dict]:
        """One step on x, then the host logits [2, S, S] of the prediction served (the
        gate's choice when gated) and the gate's decision ({} without a gate)."""
        out = self.pipeline.step(x, image)
        self._keep_pair(out)
        return self.engine.to_numpy(out.logits)[0], out.decision or {}

    def process(self, picture: Picture) -> Outcome:
        """Every step of one image (its prediction pasted back)."""
        out = self.pipeline.process(picture)
        self._keep_pair(out)
        return out

    def _keep_pair(self, out: Outcome) -> None:
        if out.pair is not None:  # both candidates, for measurements
            self.pair = (out.pair[0][0], out.pair[1][0])


def run(engine_factory: Callable[[], object], data_root, targets: list[str], size: int,
        methods: list[str], protocol: str = "domain", seed: int = 0,
        on_image: Callable[[str, str, dict, np.ndarray, Sample], None] | None = None,
        on_domain: Callable[[list[Result]], None] | None = None,
        progress: bool = True, hyperparameters: dict | None = None, norm="sample",
        gate_config=None, roi: RoiOptions | None = None,
        scale: DiscScale | None = None) -> list[Result]:
    """Adapt every method spec over every target domain; return one Result per pair.

    `methods` are specs (``grata``, ``grata@mix:0.2``, ``bn+gate``); a plain name runs
    under `norm`. `hyperparameters` are keyed by spec key or method name (the key wins).
    `roi`: the images are whole photographs (see `grata.domains.stream_domain`); each is
    scored on its pasted-back full-size mask, and `pred` given to `on_image` is that mask.
    `scale`: the model's disc scale; the images are crops of any scale, each re-cropped to
    it and scored on its pasted-back mask at its own resolution; with `roi` they are whole
    photographs, each placed at the model's scale (`grata.photo_scale.PhotoScaleLocator`:
    a photograph neither the localiser nor the model places is a skipped row).
    `on_image(key, target, row, pred, sample)` sees every scored image (overlays);
    `on_domain(results)` is called after each domain with all results so far, so a
    caller can save partial reports and never lose finished work.
    """
    specs = check_names(methods, protocol, norm)
    hp = hyperparameters or {}
    runners = {s.key: Runner(s, engine_factory(), seed, hp.get(s.key, hp.get(s.method, {})),
                             gate_config) for s in specs}
    reader = None
    if scale is not None:
        predict = source_predict(engine_factory())
        reader = PictureReader(size, ScaleLocator(size, scale, predict) if roi is None
                               else PhotoScaleLocator(size, scale, predict, roi))
    methods = list(runners)
    results: list[Result] = []
    for d_index, target in enumerate(targets):
        if protocol == "domain" or d_index == 0:
            for r in runners.values():
                r.reset()
            if reader is not None:
                reader.reset()
        per_method = {m: Result(m, target) for m in methods}
        # At the model's scale the locate step reads whole photographs too (native pixels,
        # full truth): the reader's ROI cut would refuse what the model may still find.
        stream = stream_domain(data_root, target, size, roi=None if scale else roi,
                               native=scale is not None)
        bar = _bar(stream, target, progress)
        index = 0
        for item in bar:
            if isinstance(item, Skipped):
                for res in per_method.values():
                    res.skipped.append({"file": item.name, "reason": item.reason})
                continue
            try:
                picture, item = locate_once(reader, item)
            except DataError as e:  # the locate step refused it: no method sees it
                for res in per_method.values():
                    res.skipped.append({"file": item.name, "reason": e.problem})
                continue
            index += 1
            for m, method in runners.items():
                if protocol == "episodic":
                    method.reset()
                row, pred = _score(method, picture, item, index)
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


def locate_once(reader: PictureReader | None, sample: Sample) -> tuple[Picture, Sample]:
    """The load and locate steps of a reader's sample, once for every method: a crop read
    at its own resolution is placed by `reader`'s locate step (the sample's box becomes
    the located one, for overlays), any other comes as the reader gave it. A picture the
    locator refuses is a DataError with its reason."""
    if reader is None or sample.photo is None or sample.photo.record is not None:
        return picture_of(sample), sample
    picture = reader.place(sample.photo.pixels, sample.name)
    photo = dataclasses.replace(sample.photo, box=tuple(picture.placement.box))
    return picture, dataclasses.replace(sample, photo=photo)


def _score(runner: Runner, picture: Picture, sample: Sample, index: int
           ) -> tuple[dict, np.ndarray]:
    """The record step of `grata adapt`: one image through the pipeline, scored (a whole
    photograph, or a re-crop, on its pasted-back mask against the full-size truth)."""
    out = runner.process(picture)
    if picture.placement.located:
        pred, target = out.full, sample.photo.target
    else:
        pred, target = out.pred, sample.target
    row = {"index": index, "file": sample.name, **metrics.image_metrics(pred, target),
           "time_s": out.timings["step"], **{k: float(v) for k, v in runner.last.items()},
           **picture.placement.fields()}
    if out.decision:
        d = out.decision
        row.update({"gate": d["chosen"], "gate_reason": d["reason"],
                    "gate_fallback": d["stream_fallback"]})
    return row, pred


def _bar(stream, target: str, progress: bool):
    if not progress:
        return stream
    return tqdm(stream, desc=f"{target:>12}", unit="img", leave=True, dynamic_ncols=True)

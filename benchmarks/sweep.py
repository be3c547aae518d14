"""Do no harm: GraTa and TENT across step sizes on top of each BN statistics rule.

For every statistics rule (``--rules``, `grata.norm` specs) and every step size
(``--steps``: GraTa's beta and TENT's lr), adapts the shipped edge model with the onnx
engine over every target domain of a benchmark (default: the embedded synthetic one) and
reports per configuration the Dice ((OD+OC)/2) of each target, the mean over targets, and
the worst per-target difference to the source model (the do-no-harm criterion: no target
more than 1 point below source). ``bn`` runs under each rule (no step), ``source`` once.
Everything goes through `grata.adapt.run` with the specs and hyperparameters a user would
give (``grata@mix:0.2`` with ``{"grata@mix:0.2": {"beta": 1e-2}}``), one process, seed 0;
the configurations of one step size share one pass over the stream.

    python benchmarks/sweep.py [--protocol domain|continual] [--rules sample,source,mix:0.2]
        [--steps 1e-4,1e-3,1e-2,1e-1] [--configs grata@mix:0.2/1e-2,bn@sample+gate]
        [--scale none|auto] [--images N] [--json out.json] [--plot out.png]

``--configs`` replaces the grid with a list of ``METHOD@RULE[+gate]/STEP`` (``bn@RULE``,
``source``; ``+gate``: the safety gate judges every prediction); source is always added,
as the reference of the worst-target column. ``--scale auto``: every configuration,
source included, runs behind the disc-scale stage (`grata adapt --scale auto`: each crop
re-cropped to the model's disc scale, scored in the crop's own frame); ``none`` (default)
is the crops as given at the model's size.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from datetime import datetime, timezone

import numpy as np

from grata import adapt, defaults, domains
from grata.disc_scale import model_scale
from grata.errors import GrataError
from grata.norm import NormSpec

STEP_NAME = {"grata": "beta", "tent": "lr"}
HARM_POINTS = 1.0  # the do-no-harm margin, Dice points below source


class Config:
    """One row of the sweep: a method, its statistics rule, its step size and whether the
    safety gate judges it."""

    def __init__(self, method: str, rule: str | None = None, step: float | None = None,
                 gate: bool = False):
        self.method = method
        self.rule = None if method == "source" else str(NormSpec(rule or "sample"))
        self.step = step
        self.gate = gate and method != "source"
        if (method in STEP_NAME) != (step is not None):
            raise GrataError(f"sweep config {self.label!r}: grata and tent take a step "
                             f"(METHOD@RULE/STEP), bn and source none")

    @property
    def label(self) -> str:
        if self.method == "source":
            return "source"
        text = self.spec
        return text if self.step is None else f"{text}/{self.step:g}"

    @property
    def spec(self) -> str:
        """The method spec `grata adapt --methods` takes (``grata@mix:0.2+gate``)."""
        if self.method == "source":
            return "source"
        return f"{self.method}@{self.rule}" + ("+gate" if self.gate else "")

    def hyperparameters(self) -> dict:
        """The step size, if the config sets one (the rule goes in the run's `norm`)."""
        return {} if self.step is None else {STEP_NAME[self.method]: self.step}

    @classmethod
    def parse(cls, text: str) -> "Config":
        head, _, step = text.strip().partition("/")
        gate = head.endswith("+gate") or step.endswith("+gate")
        head, step = head.removesuffix("+gate"), step.removesuffix("+gate")
        method, _, rule = head.partition("@")
        try:
            value = float(step) if step else None
        except ValueError:
            raise GrataError(f"sweep config {text!r}: step {step!r} is not a number") from None
        if method not in ("source", "bn", *STEP_NAME):
            raise GrataError(f"sweep config {text!r}: method must be source, bn, grata or tent")
        return cls(method, rule or None, value, gate)


def grid(rules: list[str], steps: list[float], methods: list[str]) -> list[Config]:
    """source, then per rule: bn (not under source: that is source) and each method at
    each step."""
    out = [Config("source")]
    for rule in rules:
        if NormSpec(rule).kind != "source":
            out.append(Config("bn", rule))
        out += [Config(m, rule, s) for m in methods for s in steps]
    return out


def _engines(artifacts, n: int, threads: int):
    from grata.engine_chooser import open_engine
    return [open_engine(artifacts, threads=threads) for _ in range(n)]


def run_configs(configs: list[Config], root, targets: list[str], size: int, artifacts,
                protocol: str, seed: int = 0, threads: int = 1, images: int | None = None,
                log=print, scale=None) -> dict:
    """Dice per target of each config: {label: {target: dice_mean}} (configs of the same
    step share one pass over the stream). `scale`: the model's disc scale, every config
    behind the disc-scale stage (None: the crops as given)."""
    groups: dict[float | None, list[Config]] = {}
    for c in configs:
        groups.setdefault(c.step, []).append(c)
    width = max(len(c) for c in groups.values())
    pool = _engines(artifacts, width + (scale is not None), threads)
    out: dict[str, dict[str, float]] = {}
    stream = adapt.stream_domain
    if images is not None:  # a shorter stream: the first `images` items of each target
        # (adapt.run reads each target through this module-level name)
        def stream(root_, domain, size_, _full=adapt.stream_domain, **kw):
            return itertools.islice(_full(root_, domain, size_, **kw), images)
    for step, members in groups.items():
        t0 = time.perf_counter()
        engines = iter(pool)
        hp = {c.spec: c.hyperparameters() for c in members}
        saved, adapt.stream_domain = adapt.stream_domain, stream
        try:
            results = adapt.run(lambda: next(engines), root, targets, size,
                                [c.spec for c in members], protocol=protocol, seed=seed,
                                progress=False, hyperparameters=hp, gate_config=None,
                                scale=scale)
        finally:
            adapt.stream_domain = saved
        for c in members:
            out[c.label] = {r.target: float(r.summary()["dice_mean"])
                            for r in results if r.method == c.spec}
        log(f"  {', '.join(c.label for c in members)}: "
            f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def summarise(dice: dict[str, dict[str, float]], targets: list[str]) -> dict:
    """Per config: the mean over targets and the worst target's difference to source."""
    src = dice["source"]
    out = {}
    for label, row in dice.items():
        diffs = {t: row[t] - src[t] for t in targets}
        worst = min(diffs, key=diffs.get)
        out[label] = {"mean": float(np.mean([row[t] for t in targets])),
                      "worst_vs_source": float(diffs[worst]), "worst_target": worst,
                      "harmed": [t for t in targets if diffs[t] < -HARM_POINTS],
                      "per_target": row}
    return out


def print_tables(summary: dict, targets: list[str], steps: list[float]) -> None:
    """The long table (every config, every target) and the curve (mean and worst per
    method@rule across steps)."""
    short = [t[:9] for t in targets]
    width = max(len(k) for k in summary)
    head = (f"{'config':<{width}} " + " ".join(f"{s:>9}" for s in short)
            + f" {'mean':>6} {'worst':>6}  worst target")
    print(head)
    print("-" * len(head))
    for label, s in summary.items():
        print(f"{label:<{width}} " + " ".join(f"{s['per_target'][t]:9.2f}" for t in targets)
              + f" {s['mean']:6.2f} {s['worst_vs_source']:+6.2f}  {s['worst_target']}"
              + ("" if s["worst_vs_source"] >= -HARM_POINTS else "  HARM"))
    rows = sorted({lab.split("/")[0] for lab in summary if "/" in lab})
    if not rows or not steps:
        return
    print()
    print("mean Dice (worst target vs source) per step size (GraTa beta, TENT lr)")
    w = max(len(r) for r in rows)
    print(f"{'method@rule':<{w}} " + " ".join(f"{s:>15g}" for s in steps))
    for r in rows:
        cells = []
        for s in steps:
            x = summary.get(f"{r}/{s:g}")
            cells.append(f"{'':>15}" if x is None else
                         f"{x['mean']:7.2f} ({x['worst_vs_source']:+5.1f})")
        print(f"{r:<{w}} " + " ".join(cells))


def plot(summary: dict, steps: list[float], path: str) -> None:
    """Mean Dice against the step size, one line per method@rule, source as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    rows = sorted({lab.split("/")[0] for lab in summary if "/" in lab})
    colours = {}
    for r in rows:
        method, rule = r.split("@")
        xs = [s for s in steps if f"{r}/{s:g}" in summary]
        ys = [summary[f"{r}/{s:g}"]["mean"] for s in xs]
        c = colours.setdefault(rule, f"C{len(colours)}")
        ax.plot(xs, ys, "-o" if method == "grata" else "--s", color=c, ms=4, label=r)
    ax.axhline(summary["source"]["mean"], color="k", lw=1, label="source")
    ax.set_xscale("log")
    ax.set_xlabel("step size (GraTa beta, TENT lr)")
    ax.set_ylabel("mean Dice over targets (%)")
    ax.legend(fontsize=6, ncol=2, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GrataError(f"{what} must be comma-separated numbers, got {text!r}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="benchmark root (default: the embedded synthetic one)")
    ap.add_argument("--source", default=None, help="source domain, left out of the targets")
    ap.add_argument("--targets", default=None, help="comma-separated (default: all)")
    ap.add_argument("--artifacts", help="exported artifacts (default: the shipped edge "
                                        "model exported once at --size)")
    ap.add_argument("--size", type=int, default=defaults.DEFAULT_SIZE)
    ap.add_argument("--protocol", default="domain", choices=adapt.PROTOCOLS)
    ap.add_argument("--rules", default="sample,source,mix:0.2,mix:0.5,ema:0.1")
    ap.add_argument("--steps", default="1e-4,1e-3,1e-2,1e-1")
    ap.add_argument("--methods", default="grata,tent")
    ap.add_argument("--configs", help="METHOD@RULE/STEP list instead of the grid")
    ap.add_argument("--images", type=int, help="only the first N images of each target")
    ap.add_argument("--scale", default="none", choices=["none", "auto"],
                    help="auto: every configuration behind the disc-scale stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write mean Dice vs step size here (PNG)")
    args = ap.parse_args(argv)
    try:
        steps = _floats(args.steps, "--steps")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if any(m not in STEP_NAME for m in methods):
            raise GrataError(f"--methods: choose from {', '.join(STEP_NAME)}")
        if args.configs:
            configs = [Config.parse(t) for t in args.configs.split(",") if t.strip()]
            if not any(c.method == "source" for c in configs):
                configs.insert(0, Config("source"))
            steps = sorted({c.step for c in configs if c.step is not None})
        else:
            configs = grid([r.strip() for r in args.rules.split(",") if r.strip()], steps,
                           methods)
        if args.images is not None and args.images < 1:
            raise GrataError("--images must be at least 1")
        root = args.data or defaults.synthetic_root(progress=True)
        chosen = args.targets.split(",") if args.targets else None
        if args.data is None and chosen is None:  # the generator's order
            from grata.synth import TARGET_DOMAINS
            chosen = list(TARGET_DOMAINS)
        targets = domains.resolve_targets(root, args.source, chosen)
        if args.artifacts:
            artifacts = args.artifacts
        else:
            from grata.artifacts import cached_artifacts
            artifacts = cached_artifacts(defaults.checkpoint(), defaults.DEFAULT_ARCH,
                                         args.size)
        scale = None
        if args.scale == "auto":
            scale, line = model_scale(_engines(artifacts, 1, args.threads)[0].manifest)
            if scale is None:
                raise GrataError(line)
    except GrataError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    print(f"sweep: {len(configs)} configurations, {len(targets)} targets, protocol "
          f"{args.protocol}", file=sys.stderr)
    dice = run_configs(configs, root, targets, args.size, artifacts, args.protocol,
                       args.seed, args.threads, args.images, scale=scale)
    summary = summarise(dice, targets)
    print_tables(summary, targets, steps)
    if args.json:
        meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "python": platform.python_version(), "command": " ".join(sys.argv),
                "protocol": args.protocol, "seed": args.seed, "size": args.size,
                "scale": args.scale,
                "images_per_target": args.images, "targets": targets,
                "seconds": round(time.perf_counter() - t0, 1)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "configs": summary}, f, indent=2)
    if args.plot:
        plot(summary, steps, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

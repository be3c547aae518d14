"""How often does the safety gate choose right? Measured where the answer is known.

For every image of every target domain of the synthetic benchmark (default: the embedded
one, edge model at 128, onnx engine, the `domain` protocol) and each adapted spec, this
computes the adapted prediction, the source prediction (theta0, stored statistics), the
gate's choice (`grata.gate`) and the true Dice of both, then prints per domain:

- right: share of images where the gate picked the better of the two (a tie, |Dice
  difference| below --tie points, counts as right either way);
- FB: fell back to the source although the adapted prediction was better;
- KA: kept the adapted prediction although the source was better;
- mean Dice (OD+OC)/2 of always-adapted, always-source, gated and oracle (the better of
  the two per image).

    python benchmarks/gate_accuracy.py [--specs bn@sample,grata@sample,grata@mix:0.2]
        [--views hflip] [--targets ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from grata import defaults, metrics
from grata.adapt import Runner
from grata.artifacts import cached_artifacts
from grata.domains import Skipped, resolve_targets, stream_domain
from grata.engine_chooser import open_engine
from grata.errors import GrataError
from grata.gate import GateConfig
from grata.specs import parse_spec


def mean_dice(logits: np.ndarray, target: np.ndarray) -> float:
    p = metrics.binarize(metrics.probs_from_logits(logits))
    return (metrics.dice(p[0], target[0]) + metrics.dice(p[1], target[1])) / 2


def measure(spec_text: str, artifacts, root, targets, gate: GateConfig, tie: float) -> dict:
    spec = parse_spec(spec_text + "+gate")
    runner = Runner(spec, open_engine(artifacts, threads=1), seed=0, hyperparameters={},
                    gate_config=gate)
    out = {}
    for target in targets:
        runner.reset()
        rows = []
        for item in stream_domain(root, target, runner.engine.size):
            if isinstance(item, Skipped):
                continue
            _, decision = runner.adapt(runner.engine.to_input(item.image), item.image)
            da, ds = (mean_dice(lg, item.target) for lg in runner.pair)
            rows.append((da, ds, decision["chosen"]))
        a = np.array([r[0] for r in rows])
        s = np.array([r[1] for r in rows])
        src = np.array([r[2] == "source" for r in rows])
        gated = np.where(src, s, a)
        adapted_better, source_better = a - s >= tie, s - a >= tie
        right = ~((src & adapted_better) | (~src & source_better))
        out[target] = {"n": len(rows), "right": float(right.mean()),
                       "fell_back_wrongly": int((src & adapted_better).sum()),
                       "kept_wrongly": int((~src & source_better).sum()),
                       "fallback_share": float(src.mean()),
                       "adapted": float(a.mean()), "source": float(s.mean()),
                       "gated": float(gated.mean()), "oracle": float(np.maximum(a, s).mean())}
    return out


def table(spec: str, res: dict) -> str:
    head = (f"{spec}: {'domain':12} {'n':>3} {'right':>6} {'FB':>3} {'KA':>3} {'src%':>5} "
            f"{'adapted':>8} {'source':>7} {'gated':>6} {'oracle':>7}")
    lines = [head]
    for t, r in res.items():
        lines.append(f"{'':{len(spec) + 2}}{t:12} {r['n']:3d} {100 * r['right']:5.0f}% "
                     f"{r['fell_back_wrongly']:3d} {r['kept_wrongly']:3d} "
                     f"{100 * r['fallback_share']:4.0f}% {r['adapted']:8.2f} "
                     f"{r['source']:7.2f} {r['gated']:6.2f} {r['oracle']:7.2f}")
    n = sum(r["n"] for r in res.values())
    mean = {k: np.mean([r[k] for r in res.values()]) for k in
            ("adapted", "source", "gated", "oracle")}
    right = sum(r["right"] * r["n"] for r in res.values()) / n
    lines.append(f"{'':{len(spec) + 2}}{'all':12} {n:3d} {100 * right:5.0f}% "
                 f"{sum(r['fell_back_wrongly'] for r in res.values()):3d} "
                 f"{sum(r['kept_wrongly'] for r in res.values()):3d} {'':5} "
                 f"{mean['adapted']:8.2f} {mean['source']:7.2f} {mean['gated']:6.2f} "
                 f"{mean['oracle']:7.2f}  (Dice: mean over domains)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default="bn@sample,grata@sample,grata@mix:0.2")
    ap.add_argument("--views", default="hflip", help="gate views (comma list; '' for none)")
    ap.add_argument("--targets", default=None)
    ap.add_argument("--tie", type=float, default=0.5, help="Dice points below which the "
                    "two predictions tie")
    ap.add_argument("--json", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    try:
        gate = GateConfig(views=tuple(v for v in args.views.split(",") if v))
        root = defaults.synthetic_root(progress=False)
        from grata.synth import SOURCE_DOMAIN
        targets = resolve_targets(root, SOURCE_DOMAIN,
                                  args.targets.split(",") if args.targets else None)
        artifacts = cached_artifacts(defaults.checkpoint(), defaults.DEFAULT_ARCH,
                                     defaults.DEFAULT_SIZE)
        print(f"gate views {list(gate.views)}: {gate.extra_forwards} extra forward passes "
              f"per image; FB = fell back though adapted was better, KA = kept adapted "
              f"though source was better (tie < {args.tie} Dice points)")
        results = {}
        for spec in args.specs.split(","):
            start = time.perf_counter()
            results[spec] = measure(spec, artifacts, root, targets, gate, args.tie)
            print(table(spec, results[spec]))
            print(f"  ({time.perf_counter() - start:.0f} s)")
    except GrataError as exc:
        print(f"gate_accuracy: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gate": gate.as_json(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does per-image normalisation help or harm? Forward-only Dice per target domain.

Runs a checkpoint (default: the shipped edge model at 128) over every target domain of a
benchmark (default: the embedded synthetic one, generated on first use) with the
BatchNorm statistics taken from

- ``source``: the running statistics stored by training (Norm2d mode "running");
- ``bn``: the current image's own statistics (mode "sample", the paper's setting);
- ``mix a``: both mixed, mu = (1-a) mu_src + a mu_img and
  var = (1-a) var_src + a var_img + a (1-a) (mu_img - mu_src)^2.

No adaptation step: it isolates what the statistics alone do. The rules are the model's
own statistics modes (`grata.models.set_norm_mode`: ``running``, ``sample``, ``mix`` with
weight a; the arithmetic of `grata.norm`), the same ones every method and engine uses, so
``mix a`` here is ``--norm mix:a`` there (a = 0 gives source's logits and a = 1 bn's).

    python benchmarks/norm_harm.py [--data ROOT] [--mix 0.1,0.2,0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from grata import defaults, domains, metrics
from grata.errors import GrataError
from grata.models import load_checkpoint, set_norm_mode


def set_statistics(model, rule: str, a: float | None = None) -> None:
    """rule: 'source', 'bn' or 'mix' (with weight a), as the model's statistics mode."""
    if rule == "mix":
        set_norm_mode(model, "mix", alpha=a)
    else:
        set_norm_mode(model, {"source": "running", "bn": "sample"}[rule])


def domain_dice(model, samples, batch: int = 16) -> np.ndarray:
    """Mean Dice ((OD+OC)/2) of each sample, in percent."""
    out = []
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            chunk = samples[i:i + batch]
            logits = model(torch.from_numpy(np.stack([s.image for s in chunk]))).numpy()
            probs = metrics.probs_from_logits(logits)
            for p, s in zip(probs, chunk):
                out.append((metrics.dice(p[0], s.target[0]) + metrics.dice(p[1], s.target[1])) / 2)
    return np.array(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="benchmark root (default: the embedded synthetic one)")
    ap.add_argument("--source", default=None, help="source domain, left out of the targets")
    ap.add_argument("--targets", default=None, help="comma-separated (default: all)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--arch", default=defaults.DEFAULT_ARCH)
    ap.add_argument("--size", type=int, default=defaults.DEFAULT_SIZE)
    ap.add_argument("--mix", default="0.1,0.2,0.5", help="mixing weights a")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args(argv)
    try:
        mix = [float(v) for v in args.mix.split(",") if v.strip()]
        if any(not 0.0 <= a <= 1.0 for a in mix):
            raise GrataError(f"--mix weights must lie in [0, 1], got {args.mix}")
        torch.set_num_threads(args.threads)
        root = args.data or defaults.synthetic_root(progress=True)
        chosen = args.targets.split(",") if args.targets else None
        if args.data is None and chosen is None:  # the generator's order, not the alphabet
            from grata.synth import TARGET_DOMAINS
            chosen = list(TARGET_DOMAINS)
        targets = domains.resolve_targets(root, args.source, chosen)
        model = load_checkpoint(args.checkpoint or defaults.checkpoint(), args.arch)
    except (GrataError, ValueError) as e:
        print(f"norm_harm: {e}", file=sys.stderr)
        return 2
    rules = [("source", None), ("bn", None)] + [("mix", a) for a in mix]
    names = ["source", "bn"] + [f"mix {a:g}" for a in mix]
    table = {}
    for t in targets:
        samples = [s for s in domains.stream_domain(root, t, args.size) if isinstance(s, domains.Sample)]
        row = {}
        for name, (rule, a) in zip(names, rules):
            set_statistics(model, rule, a)
            row[name] = float(domain_dice(model, samples).mean())
        table[t] = {"n_images": len(samples), **row}
    width = max(len(t) for t in [*targets, "mean over targets"])
    head = f"{'target':<{width}} {'n':>4} " + " ".join(f"{n:>8}" for n in names) + "  bn-source"
    print(head)
    print("-" * len(head))
    for t, row in table.items():
        print(f"{t:<{width}} {row['n_images']:>4} " + " ".join(f"{row[n]:8.2f}" for n in names)
              + f"  {row['bn'] - row['source']:+9.2f}")
    mean = {n: float(np.mean([r[n] for r in table.values()])) for n in names}
    print(f"{'mean over targets':<{width}} {'':>4} " + " ".join(f"{mean[n]:8.2f}" for n in names)
          + f"  {mean['bn'] - mean['source']:+9.2f}")
    worse = [t for t, r in table.items() if r["bn"] < r["source"] - 1.0]
    print(f"bn more than 1 point below source on {len(worse)} of {len(table)} targets"
          + (f": {', '.join(worse)}" if worse else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": str(args.checkpoint or defaults.checkpoint()),
                       "size": args.size, "table": table, "mean": mean}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

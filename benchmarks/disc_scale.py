"""Segmenting every crop at the model's own disc scale: what it gains, what it costs.

For each target domain of a benchmark (default: the embedded synthetic one, its twelve
targets and the source's test split), the source model (no adaptation; the stored BN
statistics) predicts every image

- ``given``: the crop as given (resized to the model's input), as today;
- ``image``: at the box `grata.scale_search.locate_disc` finds for that image alone;
- ``stream``: the same with the stream's running estimate (`StreamScale`, reset per
  domain, fed with the disc measured on each image's final prediction);
  in both, the prediction on the box is kept unless the one as given shows the more
  plausible disc (`prefer_scaled`, no extra pass);
- ``ceiling``: at the box that shows the TRUE disc (from the mask) at the model's median
  diameter, centred: what a perfect locator would give.

``--norm RULE`` scores predictions made under a BN statistics rule instead (``bn@RULE``
of `grata adapt`: no step; e.g. the product's ``mix:0.3``): the locator still decides
with the source model, so the boxes are the same, and the ceiling is that rule's at the
true disc.

Every prediction is pasted back and scored in the frame of the image as given (its own
resolution), so the four columns compare like with like. ``--paste nearest`` (default)
pastes as `grata adapt` and `grata serve` do (`grata.placement.Placement.paste`: the
thresholded mask, nearest neighbour), ``bilinear`` upsamples the probabilities first
(`grata.scale_search.paste_back`). Also per domain: the share of
the ceiling's gain the stream variant reaches, the scale error (the diameter the
placement used against the true one), the model passes per image (all images, and those
after the stream settled; the image's own prediction counts as one), and which domains
lose anything against ``given``.

    python benchmarks/disc_scale.py [--data ROOT --source D] [--engine onnx|torch]
                                    [--padding edge|black] [--norm RULE]
                                    [--paste nearest|bilinear] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import numpy as np

from grata import defaults, metrics
from grata.decode import load_photo_pair
from grata.domains import domain_entries, resolve_targets
from grata.disc_scale import disc_geometry, model_scale
from grata.errors import GrataError
from grata.placement import Placement
from grata.scale_search import (
    StreamScale,
    locate_disc,
    paste_back,
    prefer_scaled,
    recrop,
    square_box,
)

VARIANTS = ("given", "image", "stream", "ceiling")


def make_predict(engine: str, checkpoint, arch: str, size: int, threads: int,
                 norm: str = "source"):
    """(predict: float32 [3, S, S] -> probabilities [2, S, S] with the stored statistics,
    the manifest or None, a word on the model, the same under the statistics `norm`)."""
    if engine == "onnx":
        from grata.artifacts import cached_artifacts, default_artifacts
        from grata.engine_chooser import open_engine
        folder = cached_artifacts(checkpoint, arch, size) if checkpoint else \
            default_artifacts(size)[0]
        eng = open_engine(folder, "cpu", threads)

        def under(rule):
            def predict(x):
                return metrics.probs_from_logits(eng.infer(eng.to_input(x), norm=rule))[0]
            return predict
        return under("source"), eng.manifest, f"onnx {folder.name}", under(norm)
    if norm != "source":
        raise GrataError("--norm goes with --engine onnx")
    import torch

    from grata.models import load_checkpoint, set_norm_mode
    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint or defaults.checkpoint(), arch).eval()
    set_norm_mode(model, "running")

    def predict(x):
        with torch.no_grad():
            return torch.sigmoid(model(torch.from_numpy(x[None])))[0].numpy()
    return predict, None, "torch", predict


def score(pred, truth) -> np.ndarray:
    """Dice (OD, OC) in percent of a bool [2, H, W] prediction."""
    return np.array([metrics.dice(pred[0], truth[0]), metrics.dice(pred[1], truth[1])])


def pasted(pred, box, shape, how: str = "nearest") -> np.ndarray:
    """A [2, S, S] prediction on `box` as bool [2, H, W] of the image as given: as the
    product pastes (``nearest``) or with the probabilities upsampled (``bilinear``)."""
    if how == "bilinear":
        return paste_back(pred, box, shape)
    return Placement(tuple(shape), tuple(box)).paste(pred)


def run_domain(root, domain, predict, scale, size, padding, bar, splits=None,
               served=None, paste: str = "nearest") -> dict:
    """One domain's row; `served` (default `predict`) makes the scored predictions."""
    entries, _ = domain_entries(root, domain, *([splits] if splits else []))
    served = served or predict
    dice = {v: [] for v in VARIANTS}
    passes = {"image": [], "stream": [], "stream_settled": []}
    err = {"image": [], "stream": []}
    hows = {"image": Counter(), "stream": Counter()}
    stream = StreamScale()
    for e in entries:
        try:
            pixels, truth = load_photo_pair(e.image_path, e.mask_path)
        except GrataError:
            bar.update()
            continue
        H, W = pixels.shape[:2]
        full = (0, 0, W, H)
        given = served(recrop(pixels, full, size, padding))
        dice["given"].append(score(pasted(given, full, (H, W), paste), truth))
        g = disc_geometry(truth[0])
        if g is None:  # no disc in the mask: nothing to place the ceiling on
            dice["ceiling"].append(dice["given"][-1])
        else:
            box = square_box(g[0], g[1], g[2] / scale.diameter)
            dice["ceiling"].append(score(pasted(served(recrop(pixels, box, size, padding)),
                                                box, (H, W), paste), truth))
        for v in ("image", "stream"):
            settled = stream.settled
            pl = locate_disc(pixels, predict, scale, size, stream=stream if v == "stream"
                             else None)
            box = pl.box
            if pl.identity and pl.as_given is not None:
                pred, extra = pl.as_given, 0  # the image as given was predicted already
            elif pl.on_box is not None:
                pred, extra = pl.on_box, 0  # so was the box (a settled stream's one look)
            else:
                pred, extra = predict(recrop(pixels, box, size, padding)), 1
                if not pl.seen_at_scale and not prefer_scaled(pl, pred, scale):
                    # the box missed what was found as given
                    pred, box = pl.as_given, full
                    hows[v]["kept as given"] += 1
            shown = pred if served is predict else served(recrop(pixels, box, size, padding))
            dice[v].append(score(pasted(shown, box, (H, W), paste), truth))
            passes[v].append(pl.n_forward + extra)
            hows[v][pl.how] += 1
            if v == "stream":
                if settled:
                    passes["stream_settled"].append(pl.n_forward + extra)
                stream.observe(pl, pred if box == pl.box else None)
            if g is not None and pl.diameter:
                err[v].append(pl.diameter / g[2])
        bar.update()
    mean = {v: np.mean(d, axis=0) if d else np.full(2, np.nan) for v, d in dice.items()}
    row = {"n_images": len(dice["given"])}
    for v in VARIANTS:
        row[v] = {"od": float(mean[v][0]), "oc": float(mean[v][1]),
                  "mean": float(mean[v].mean())}
    gain = row["ceiling"]["mean"] - row["given"]["mean"]
    row["share_of_ceiling"] = (float((row["stream"]["mean"] - row["given"]["mean"]) / gain)
                               if gain >= 2.0 else None)
    for v in ("image", "stream"):
        r = np.abs(np.log(err[v])) if err[v] else np.array([np.nan])
        row[f"scale_error_{v}"] = {"median": float(np.exp(np.median(r)) - 1),
                                   "p90": float(np.exp(np.percentile(r, 90)) - 1)}
        row[f"passes_{v}"] = float(np.mean(passes[v])) if passes[v] else None
        row[f"how_{v}"] = dict(hows[v])
    row["passes_stream_settled"] = (float(np.mean(passes["stream_settled"]))
                                    if passes["stream_settled"] else None)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="benchmark root (default: the embedded synthetic one)")
    ap.add_argument("--source", default=None, help="source domain, left out of the targets "
                    "(default: the synthetic source, whose test split is reported too)")
    ap.add_argument("--targets", default=None, help="comma-separated (default: all)")
    ap.add_argument("--checkpoint", default=None, help="default: the shipped edge model")
    ap.add_argument("--arch", default=defaults.DEFAULT_ARCH)
    ap.add_argument("--size", type=int, default=defaults.DEFAULT_SIZE)
    ap.add_argument("--disc-scale", type=float, default=None, metavar="D",
                    help="the model's disc diameter over the crop's side (default: its "
                    "manifest's or its checkpoint's .scale.json)")
    ap.add_argument("--engine", default="onnx", choices=["onnx", "torch"])
    ap.add_argument("--padding", default="edge", choices=["edge", "black"],
                    help="what a box outside the image is filled with (default edge)")
    ap.add_argument("--norm", default="source", metavar="RULE",
                    help="BN statistics of the scored predictions (bn@RULE, no step; the "
                    "locator always uses the source's): default source")
    ap.add_argument("--paste", default="nearest", choices=["nearest", "bilinear"],
                    help="how a prediction goes back into the image as given: as the "
                    "product does (nearest, default) or its probabilities upsampled")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args(argv)
    try:
        from grata import synth
        root = args.data or defaults.synthetic_root(progress=not args.quiet)
        source = args.source or (synth.SOURCE_DOMAIN if args.data is None else None)
        chosen = args.targets.split(",") if args.targets else None
        if args.data is None and chosen is None:  # the generator's order, not the alphabet
            chosen = list(synth.TARGET_DOMAINS)
        targets = resolve_targets(root, source, chosen)
        from grata.norm import NormSpec
        norm = str(NormSpec(args.norm))
        predict, manifest, model_word, served = make_predict(
            args.engine, args.checkpoint, args.arch, args.size, args.threads, norm)
        scale, line = model_scale(manifest, args.checkpoint or defaults.checkpoint(),
                                  args.disc_scale)
        if scale is None:
            raise GrataError(line)
    except GrataError as e:
        print(f"disc_scale: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm
    rows = [(t, t, None) for t in targets]
    if args.data is None and args.targets is None:  # the images the model was not trained on
        rows.insert(0, (f"{source} (source test)", source, ("test",)))
    total = sum(len(domain_entries(root, d, *([sp] if sp else []))[0]) for _, d, sp in rows)
    print(f"{model_word}; {line}; padding {args.padding}; statistics {norm}; paste "
          f"{args.paste}", file=sys.stderr)
    table = {}
    t0 = time.perf_counter()
    with tqdm(total=total, desc="disc scale", unit="img", disable=args.quiet) as bar:
        for name, domain, splits in rows:
            table[name] = run_domain(root, domain, predict, scale, args.size, args.padding, bar,
                                     splits, served if norm != "source" else None, args.paste)
    seconds = time.perf_counter() - t0
    print_table(table)
    print(f"({seconds:.0f} s, {total} images)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model_word, "disc_scale": scale.to_json(), "norm": norm,
                       "paste": args.paste,
                       "padding": args.padding, "size": args.size, "table": table}, f,
                      indent=2)
    return 0


def print_table(table: dict) -> None:
    width = max(len(t) for t in [*table, "mean over targets"])
    head = (f"{'target':<{width}} {'n':>3}  {'given OD/OC/mean':>17}  {'image':>5}  "
            f"{'stream OD/OC/mean':>17}  {'ceil':>5}  {'share':>5}  {'err img/str':>11}  "
            f"{'passes img/str/settled':>22}")
    print(head)
    print("-" * len(head))

    def fmt(r):
        return f"{r['od']:5.1f} {r['oc']:5.1f} {r['mean']:5.1f}"
    for t, r in table.items():
        share = "" if r["share_of_ceiling"] is None else f"{100 * r['share_of_ceiling']:4.0f}%"
        settled = r["passes_stream_settled"]
        err = [100 * r[f"scale_error_{v}"]["median"] for v in ("image", "stream")]
        print(f"{t:<{width}} {r['n_images']:>3}  {fmt(r['given'])}  {r['image']['mean']:5.1f}  "
              f"{fmt(r['stream'])}  {r['ceiling']['mean']:5.1f}  {share:>5}  "
              f"{err[0]:4.1f}/{err[1]:4.1f}%  "
              f"{r['passes_image']:6.2f} {r['passes_stream']:6.2f} "
              f"{'' if settled is None else f'{settled:6.2f}':>6}")
    targets = [t for t in table if "(source" not in t]
    mean = {v: float(np.mean([table[t][v]["mean"] for t in targets])) for v in VARIANTS}
    gain = mean["ceiling"] - mean["given"]
    print(f"{'mean over targets':<{width}} {'':>3}  {'':>11} {mean['given']:5.1f}  "
          f"{mean['image']:5.1f}  {'':>11} {mean['stream']:5.1f}  {mean['ceiling']:5.1f}  "
          f"{100 * (mean['stream'] - mean['given']) / gain if gain > 0 else 0:4.0f}%")
    for v in ("image", "stream"):
        worse = [(t, table[t][v]["mean"] - table[t]["given"]["mean"]) for t in table
                 if table[t][v]["mean"] < table[t]["given"]["mean"]]
        print(f"{v}: below given on {len(worse)} of {len(table)}"
              + (": " + ", ".join(f"{t} {d:+.2f}" for t, d in worse) if worse else ""))


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end Dice on whole photographs: the localiser's crop against the true disc's.

On synthetic whole photographs (`grata.synth_whole`, test split of each target domain),
a model (default: the shipped edge model at 128, torch engine) adapts and segments with
each method twice:

- ``auto``: `grata adapt --roi auto`: the disc is localised (`grata.roi`), the benchmark's
  ROI cut there, the crop adapted and segmented, the mask pasted back;
- ``oracle``: the same, with the ROI cut at the true disc (``synth.json``) by the same
  rule.

Both are scored on the whole-photograph mask against the full-size truth, so the
difference is what localisation costs end to end. A photograph the localiser rejects has
no mask: it counts as Dice 0 in ``auto`` (and is listed). Also per domain: the median
centre error of the localiser in disc diameters and the share of photographs whose ROI
holds the whole disc. ``--hostile artefact`` / ``--hostile uneven`` renders every
photograph with a bright reflection near the FOV rim (strength 1.5) or a strong
illumination slope (0.9), as the last rows of ``roi_accuracy.py``.

``--scale`` adds the model's disc scale (`grata.photo_scale`): ``--roi auto --scale auto``
(share scored, Dice, how many the model's second opinion admitted) beside today's FOV rule,
the same eyes' crops (``oracle``) and the ceiling (the box that gives the true disc the
model's diameter).

    OMP_NUM_THREADS=1 python benchmarks/roi_end_to_end.py [--n 16] [--methods source,bn,grata]
        [--hostile artefact|uneven] [--scale]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from PIL import Image

from grata import adapt, defaults, synth, synth_whole
from grata.domains import RoiOptions
from grata.engine_chooser import engine_factory

HOSTILE = {"artefact": {"artefact": 1.5, "uneven": 0.0},
           "uneven": {"artefact": 0.0, "uneven": 0.9}}


def write_hostile(root, kind: str, seed: int, n: int, width: int) -> None:
    """Test photographs of every target domain, all with one hostile feature, in the CSV
    layout with a ``synth.json`` of their true discs (seed + 1, as roi_accuracy.py)."""
    root = Path(root)
    discs = {}
    for domain in synth_whole.TARGET_DOMAINS:
        rows = ["image,mask"]
        for i in range(n):
            image, mask, info = synth_whole.render_whole(
                synth_whole._rng(seed + 1, domain, "test", i), domain, width, **HOSTILE[kind])
            rel = f"{domain}/{domain}_{i:04d}"
            (root / domain).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / f"{rel}.png", compress_level=1)
            Image.fromarray(mask).save(root / f"{rel}_mask.png")
            rows.append(f"{rel}.png,{rel}_mask.png")
            discs[f"{rel}.png"] = info
        (root / f"{domain}_test.csv").write_text("\n".join(rows) + "\n")
    (root / "synth.json").write_text(json.dumps({"discs": discs}))


def truth_of(root) -> dict:
    """The true disc and FOV of every photograph (``synth.json``), keyed by image name."""
    return json.loads((Path(root) / "synth.json").read_text())["discs"]


def compare(factory, root, targets, size: int, methods, threshold: float | None = None,
            seed: int = 0, scale=None) -> list[dict]:
    """Per (method, target): end-to-end Dice (mean of OD and OC, whole-photograph masks)
    with the localiser's ROI (``auto``; a rejected photograph counts 0) and with the ROI
    at the true disc (``oracle``: the same eyes' crops), and the localiser's accuracy on
    the photographs. With `scale` (the model's disc scale) also at the model's scale:
    ``--roi auto --scale auto`` (``scale``) and the box that gives the true disc the
    model's diameter (``ceiling``)."""
    truth = truth_of(root)
    auto_opts = RoiOptions() if threshold is None else RoiOptions(threshold=threshold)
    modes = [("auto", auto_opts, None), ("oracle", RoiOptions(discs=truth), None)]
    if scale is not None:
        modes += [("scale", auto_opts, scale), ("ceiling", RoiOptions(discs=truth), scale)]
    runs = {}
    for mode, opts, sc in modes:
        runs[mode] = {(r.method, r.target): r for r in adapt.run(
            factory, root, targets, size, methods, seed=seed, progress=False, roi=opts,
            scale=sc)}
    rows = []
    for (method, target), auto in runs["auto"].items():
        oracle = runs["oracle"][(method, target)]
        n = len(oracle.images)
        err, held = [], []
        for img in auto.images:
            t, box = truth[img["file"]], img["roi"]["box"]
            err.append(np.hypot(img["roi"]["cx"] - t["cx"], img["roi"]["cy"] - t["cy"])
                       / (2 * t["ry"]))
            # the whole true disc (its ellipse's box) inside the ROI
            held.append(box[0] <= t["cx"] - t["rx"] and t["cx"] + t["rx"] <= box[2]
                        and box[1] <= t["cy"] - t["ry"] and t["cy"] + t["ry"] <= box[3])
        rows.append({
            "method": method, "target": target, "n": n, "rejected": len(auto.skipped),
            "rejected_files": [s["file"] for s in auto.skipped],
            "dice_auto": float(sum(i["dice_mean"] for i in auto.images) / max(n, 1)),
            "dice_oracle": float(np.mean([i["dice_mean"] for i in oracle.images])),
            "dice_od_auto": float(sum(i["dice_od"] for i in auto.images) / max(n, 1)),
            "dice_od_oracle": float(np.mean([i["dice_od"] for i in oracle.images])),
            "err_dd": float(np.median(err)) if err else float("nan"),
            "held": float(np.sum(held) / max(n, 1)),
        })
        for mode in ("scale", "ceiling"):
            if mode in runs:
                run = runs[mode][(method, target)]
                rows[-1].update({
                    f"dice_{mode}": float(sum(i["dice_mean"] for i in run.images) / max(n, 1)),
                    f"rejected_{mode}": len(run.skipped),
                    f"rejected_files_{mode}": [s["file"] for s in run.skipped]})
        if "scale" in runs:
            rows[-1]["second_opinion"] = sum(
                bool(i["roi"].get("second_opinion")) for i in runs["scale"][(method, target)]
                .images)
    return rows


def scale_table(rows) -> str:
    """Share scored and mean Dice per mode: today's FOV rule (``--scale none``), the
    model's scale (``--scale auto``), the same eyes' crops and the ceiling."""
    head = (f"{'method':8s} {'target':10s} {'n':>3s} | {'FOV rule':>14s} | {'--scale auto':>14s}"
            f" {'2nd':>3s} | {'crops':>6s} {'ceiling':>7s}")
    lines = [head, "-" * len(head)]

    def line(m, t, mine):
        n = sum(r["n"] for r in mine)
        cells = []
        for d, rej in (("dice_auto", "rejected"), ("dice_scale", "rejected_scale")):
            scored = 100 * (1 - sum(r[rej] for r in mine) / max(n, 1))
            cells.append(f"{float(np.mean([r[d] for r in mine])):6.2f} {scored:5.1f}%")
        o, c = (float(np.mean([r[k] for r in mine])) for k in ("dice_oracle", "dice_ceiling"))
        second = sum(r["second_opinion"] for r in mine)
        return (f"{m:8s} {t[:10]:10s} {n:3d} | {cells[0]:>14s} | {cells[1]:>14s} {second:3d} | "
                f"{o:6.2f} {c:7.2f}")
    for r in rows:
        lines.append(line(r["method"], r["target"], [r]))
    for m in dict.fromkeys(r["method"] for r in rows):
        lines.append(line(m, "mean", [r for r in rows if r["method"] == m]))
    return "\n".join(lines)


def table(rows) -> str:
    head = (f"{'method':8s} {'target':10s} {'n':>3s} {'rej':>3s} | {'auto':>6s} {'oracle':>6s}"
            f" {'delta':>6s} | {'OD auto':>7s} {'OD orc':>7s} | {'err/DD':>6s} {'crop%':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:8s} {r['target'][:10]:10s} {r['n']:3d} {r['rejected']:3d} | "
                     f"{r['dice_auto']:6.2f} {r['dice_oracle']:6.2f} "
                     f"{r['dice_auto'] - r['dice_oracle']:+6.2f} | {r['dice_od_auto']:7.2f} "
                     f"{r['dice_od_oracle']:7.2f} | {r['err_dd']:6.3f} {100 * r['held']:6.1f}")
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        a, o = (float(np.mean([r[k] for r in mine])) for k in ("dice_auto", "dice_oracle"))
        lines.append(f"{m:8s} {'mean':10s} {sum(r['n'] for r in mine):3d} "
                     f"{sum(r['rejected'] for r in mine):3d} | {a:6.2f} {o:6.2f} {a - o:+6.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="test photographs per target domain")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0, help="seed of the photographs")
    ap.add_argument("--methods", default="source,bn,grata")
    ap.add_argument("--hostile", choices=sorted(HOSTILE), help="every photograph with a rim "
                    "reflection or a strong illumination slope")
    ap.add_argument("--scale", action="store_true", help="also at the model's disc scale "
                    "(--roi auto --scale auto, and the true disc at that scale)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    factory = engine_factory("torch", checkpoint=defaults.checkpoint(),
                             arch=defaults.DEFAULT_ARCH)
    targets = list(synth_whole.TARGET_DOMAINS)
    with tempfile.TemporaryDirectory() as tmp:
        if args.hostile:
            write_hostile(tmp, args.hostile, args.seed, args.n, args.width)
        else:
            synth_whole.generate_whole(tmp, seed=args.seed, n_source=(0, 0),
                                       n_target=(0, args.n), size=args.width, progress=False)
        rows = compare(factory, tmp, targets, defaults.DEFAULT_SIZE,
                       [m.strip() for m in args.methods.split(",")],
                       scale=defaults.disc_scale() if args.scale else None)
    print(f"whole photographs {args.width} x {round(args.width * synth_whole.ASPECT)}, "
          f"seed {args.seed}{', all ' + args.hostile if args.hostile else ''}, source {synth.SOURCE_DOMAIN}; Dice (%) = (OD + OC) / 2 on the "
          f"whole-photograph mask")
    print(table(rows))
    if args.scale:
        print("\nshare scored and mean Dice (a refused photograph counts 0); 2nd: admitted "
              "by the model's second opinion")
        print(scale_table(rows))
    for r in rows:
        for key, what in (("rejected_files", "rejected"),
                          ("rejected_files_scale", "rejected at --scale auto")):
            if r.get(key):
                print(f"{what} ({r['method']}, {r['target']}): {', '.join(r[key])}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

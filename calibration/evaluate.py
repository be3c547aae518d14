"""Dice of float32 against reduced-precision artifacts, with and without adaptation.

Every variant (an artifact folder) runs through the same adaptation loop and metric
code as `grata adapt` (`grata.adapt.run`, `grata.report.build_report`). Methods:
``bn`` predicts with theta0 and the statistics of the current image (no adaptation);
``grata`` adapts theta image by image and predicts with the adapted theta. In a
quantised folder only the prediction graph is INT8 (the gradients stay float32), so
the INT8 ``grata`` predictions are made at exactly the theta of the float32 run.
"""

from __future__ import annotations

import math
from pathlib import Path

from grata.errors import GrataError
from grata.adapt import run
from grata.export.manifest import load_manifest
from grata.report import build_report
from grata.engine_chooser import open_engine
from grata.calibration.quantize import graph_bytes

DICE_KEYS = ("dice_od", "dice_oc", "dice_mean")
TOLERANCE = 1.0  # points of mean Dice: the target for INT8


def evaluate(variants: dict, data_root, targets: list[str], methods=("bn", "grata"),
             seed: int = 0, threads: int | None = None, progress: bool = False) -> dict:
    """Run `methods` over `targets` for each variant {name: artifact folder}; the first
    variant is the reference. Returns {"reports": {name: report}, "rows": [...],
    "mean_over_targets": {...}} with Dice deltas against the reference."""

    if not variants:
        raise GrataError("nothing to evaluate")
    sizes = {name: load_manifest(folder, verify=False)["size"]
             for name, folder in variants.items()}
    if len(set(sizes.values())) != 1:
        raise GrataError(f"the variants were exported at different sizes: {sizes}")
    reports = {}
    for name, folder in variants.items():
        def factory(folder=folder):
            return open_engine(folder, threads=threads)

        results = run(factory, data_root, list(targets), sizes[name], list(methods),
                      "domain", seed, progress=progress)
        config = {"variant": name, "artifacts": str(folder), "data": str(data_root),
                  "targets": list(targets), "methods": list(methods), "protocol": "domain",
                  "seed": seed}
        reports[name] = build_report(results, config)
    return {"reports": reports, **compare(reports)}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x)


def compare(reports: dict) -> dict:
    """Per (method, target) and over targets: each variant's Dice and its difference
    from the first variant's (the reference)."""
    names = list(reports)
    ref = names[0]
    cells = {name: {(r["method"], r["target"]): r for r in rep["results"]}
             for name, rep in reports.items()}
    rows = []
    order = list(dict.fromkeys(m for m, _ in cells[ref]))
    for (method, target), r0 in sorted(cells[ref].items(), key=lambda kv: order.index(kv[0][0])):
        row = {"method": method, "target": target, "n_images": r0["n_images"]}
        for name in names:
            r = cells[name].get((method, target), {})
            row[name] = {k: r.get(k, math.nan) for k in DICE_KEYS}
            if name != ref:
                a, b = r0.get("dice_mean"), r.get("dice_mean")
                row[name]["delta_dice_mean"] = b - a if _finite(a) and _finite(b) else math.nan
        rows.append(row)
    overall = {}
    for method in dict.fromkeys(m for m, _ in cells[ref]):
        entry = {name: dict(reports[name]["mean_over_targets"].get(method, {}))
                 for name in names}
        for name in names[1:]:
            a = entry[ref].get("dice_mean", math.nan)
            b = entry[name].get("dice_mean", math.nan)
            entry[name]["delta_dice_mean"] = b - a if _finite(a) and _finite(b) else math.nan
        overall[method] = entry
    met = {name: all(_finite(overall[m][name]["delta_dice_mean"])
                     and abs(overall[m][name]["delta_dice_mean"]) <= TOLERANCE
                     for m in overall)
           for name in names[1:]}
    return {"reference": ref, "rows": rows, "mean_over_targets": overall,
            "tolerance_dice_points": TOLERANCE, "within_tolerance": met}


def format_comparison(comparison: dict) -> str:
    """A table: per method and target, OD / OC / mean Dice of every variant, and the
    difference of the mean from the reference."""
    names = list(comparison["reports"])
    ref = comparison["reference"]

    def f(x):
        return f"{x:7.2f}" if _finite(x) else "      -"

    head = f"{'method':9} {'target':12}" + "".join(
        f" | {name[:4] + ' OD':>7} {'OC':>7} {'mean':>7}" for name in names) + "".join(
        f" | {'d ' + name[:5]:>7}" for name in names if name != ref)
    lines = [head, "-" * len(head)]
    rows = comparison["rows"] + [
        {"method": m, "target": "mean", **e} for m, e in
        comparison["mean_over_targets"].items()]
    for row in rows:
        line = f"{row['method']:9} {row['target'][:12]:12}"
        for name in names:
            c = row.get(name, {})
            line += f" | {f(c.get('dice_od'))} {f(c.get('dice_oc'))} {f(c.get('dice_mean'))}"
        for name in names:
            if name != ref:
                line += f" | {f(row.get(name, {}).get('delta_dice_mean'))}"
        lines.append(line)
    for name, ok in comparison["within_tolerance"].items():
        lines.append(f"{name}: mean Dice within {comparison['tolerance_dice_points']:g} point "
                     f"of {ref} for every method: {'yes' if ok else 'NO'}")
    return "\n".join(lines)


def model_sizes(variants: dict) -> dict:
    """Bytes of each variant's infer graph (file + the external data it uses) and of
    the whole artifact folder."""
    out = {}
    for name, folder in variants.items():
        folder = Path(folder)
        m = load_manifest(folder, verify=False)
        out[name] = {"infer_bytes": graph_bytes(folder / m["graphs"]["infer"]),
                     "folder_bytes": sum(p.stat().st_size for p in folder.iterdir()
                                         if p.is_file())}
    return out

"""What a run leaves behind: the Dice table, report.json, overlays and a stream plot."""

from __future__ import annotations

import io
import json
import math

import numpy as np
from PIL import Image, ImageDraw

from grata import metrics
from grata.atomic import write_atomic

# One colour per method in plots (RGB).
PALETTE = [(90, 90, 90), (31, 119, 180), (255, 127, 14), (214, 39, 40), (44, 160, 44),
           (148, 103, 189), (140, 86, 75)]


def write_json_atomic(path, obj) -> None:
    """Write JSON crash-safely (NaN becomes null, so every reader can parse it)."""
    write_atomic(path, json.dumps(_clean(obj), indent=1, allow_nan=False).encode())


def _clean(obj):
    # JSON has no NaN: write null so every reader can parse the report.
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, (np.floating, np.integer)):
        return _clean(obj.item())
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def build_report(results, config: dict, complete: bool = True) -> dict:
    rows = [r.summary() for r in results]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    overall = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m and r["n_images"]]
        overall[m] = {k: float(np.mean([r[k] for r in mine])) if mine else math.nan
                      for k in ("dice_od", "dice_oc", "dice_mean", "vcdr_mae")}
    return {"format_version": 1, "complete": complete, "config": config,
            "results": rows, "mean_over_targets": overall}


def format_table(report: dict) -> str:
    """The paper's table: rows = methods, per target OD / OC / mean, then the average."""
    rows = report["results"]
    targets = list(dict.fromkeys(r["target"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["target"]): r for r in rows}
    w = 6
    mw = max([14] + [len(m) + 1 for m in methods])  # spec keys such as grata@mix:0.2+gate

    def f(x):
        return f"{x:{w}.2f}" if x is not None and not (isinstance(x, float) and math.isnan(x)) \
            else " " * (w - 1) + "-"

    head1 = f"{'':{mw}}" + "".join(f"| {t[:3 * w + 2]:^{3 * w + 2}} " for t in targets) \
        + f"| {'mean over targets':^{3 * w + 2}}"
    head2 = f"{'method':{mw}}" + "".join(f"| {'OD':>{w}} {'OC':>{w}} {'mean':>{w}} "
                                       for _ in targets + ['']).rstrip()
    lines = [head1, head2, "-" * len(head2)]
    for m in methods:
        line = f"{m:{mw}}"
        for t in targets:
            r = cell.get((m, t), {})
            line += f"| {f(r.get('dice_od'))} {f(r.get('dice_oc'))} {f(r.get('dice_mean'))} "
        o = report["mean_over_targets"][m]
        line += f"| {f(o['dice_od'])} {f(o['dice_oc'])} {f(o['dice_mean'])}"
        lines.append(line)
    skipped = {(r["target"], s["file"]) for r in rows for s in r["skipped"]}
    if skipped:
        lines.append(f"({len(skipped)} image(s) skipped; see report.json 'skipped')")
    return "\n".join(lines)


def overlay(image: np.ndarray, pred: np.ndarray, target: np.ndarray | None = None) -> Image.Image:
    """RGB picture: prediction filled translucent (disc green, cup blue), truth outlined."""
    rgb = (np.clip(image.transpose(1, 2, 0), 0, 1) * 255).astype(np.float32)
    for ch, colour in ((0, (0, 255, 0)), (1, (0, 120, 255))):
        m = pred[ch].astype(bool)
        rgb[m] = 0.6 * rgb[m] + 0.4 * np.array(colour, np.float32)
    if target is not None:
        for ch, colour in ((0, (255, 255, 0)), (1, (255, 0, 255))):
            t = target[ch].astype(bool)
            edge = t & ~(np.roll(t, 1, 0) & np.roll(t, -1, 0) & np.roll(t, 1, 1)
                         & np.roll(t, -1, 1))
            rgb[edge] = colour
    return Image.fromarray(rgb.astype(np.uint8))


def save_png_atomic(img: Image.Image, path) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def plot_stream(report: dict, path, width: int = 900, height: int = 420) -> None:
    """Running mean Dice over the stream, one line per method, domains separated."""
    rows = report["results"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    series = {m: [] for m in methods}
    bounds = []
    for t in targets:
        for m in methods:
            r = next((r for r in rows if r["method"] == m and r["target"] == t), None)
            vals = [i["dice_mean"] for i in (r["images"] if r else [])]
            series[m] += list(np.cumsum(vals) / np.arange(1, len(vals) + 1)) if vals else []
        bounds.append((t, max(len(s) for s in series.values())))
    n = max((len(s) for s in series.values()), default=0)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = 50, 30, width - 150, height - 40
    d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    d.text((x0, 8), "running mean Dice (OD+OC)/2 over the stream", fill=(0, 0, 0))
    lo = min((min(s) for s in series.values() if s), default=0.0)
    lo = max(0.0, math.floor(lo / 10) * 10)

    def xy(i, v):
        return (x0 + (x1 - x0) * i / max(n - 1, 1), y1 - (y1 - y0) * (v - lo) / (100 - lo))

    for v in np.linspace(lo, 100, 5):
        d.text((5, xy(0, v)[1] - 6), f"{v:.0f}", fill=(0, 0, 0))
    start = 0
    for t, end in bounds:
        d.line([xy(end - 1, lo), xy(end - 1, 100)], fill=(200, 200, 200))
        d.text((xy(start, lo)[0] + 3, y1 + 5), t[:14], fill=(0, 0, 0))
        start = end
    for k, m in enumerate(methods):
        c = PALETTE[k % len(PALETTE)]
        pts = [xy(i, v) for i, v in enumerate(series[m])]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        d.text((x1 + 10, y0 + 16 * k), m, fill=c)
    save_png_atomic(img, path)


OVERLAY_WIDTH = 1024  # a whole photograph's overlay is at most this wide
BOX_COLOUR = (255, 64, 0)


def photo_overlay(pixels: np.ndarray, pred: np.ndarray, target: np.ndarray | None, box,
                  width: int = OVERLAY_WIDTH) -> Image.Image:
    """A whole photograph's overlay: the photograph (uint8 [H, W, 3]) downscaled to at
    most ``width`` px wide with its aspect kept, the pasted-back prediction and the truth
    ([2, H, W]) drawn as by `overlay`, and the ROI ``box`` (x0, y0, x1, y1) outlined."""
    H, W = pixels.shape[:2]
    k = min(1.0, width / W)
    w, h = max(1, round(W * k)), max(1, round(H * k))
    small = np.asarray(Image.fromarray(pixels).resize((w, h), Image.BILINEAR))

    def shrink(m):
        return np.stack([np.asarray(Image.fromarray(c.astype(np.uint8) * 255).resize(
            (w, h), Image.NEAREST)) > 127 for c in metrics.binarize(m)])

    img = overlay(small.transpose(2, 0, 1) / 255.0, shrink(pred),
                  None if target is None else shrink(target))
    x0, y0, x1, y1 = (v * k for v in box)
    ImageDraw.Draw(img).rectangle([x0, y0, x1 - 1, y1 - 1], outline=BOX_COLOUR,
                                  width=max(2, round(w / 400)))
    return img

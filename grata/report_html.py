"""report.html: one self-contained page per run, for the people who look at results.

- `write_adapt_html(run_dir)`: from RUN_DIR/report.json (and RUN_DIR/overlays/ when the run
  wrote them): the paper's Dice table, a Dice-over-stream plot per target domain, per-image
  rows (worst first, sortable), numerical resets, skipped files and the configuration.
- `write_serve_html(outbox)`: from the per-image JSON records of a `grata serve` outbox, in
  arrival order: overlay, disc / cup area, vCDR (flagged above a threshold), confidence,
  guards that tripped and timings. Written atomically, so a page kept open can be reloaded
  while the server adds images.
- `write_report(path)`: whichever of the two the folder holds.

Images are inlined (overlays downscaled), so the page needs no network and no other file.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

from grata.atomic import write_atomic
from grata.errors import GrataError
from grata.html_page import (
    data_uri,
    esc,
    fmt,
    img_tag,
    is_number,
    num_cell,
    page,
    table,
    text_cell,
    thumbnail_uri,
    value_html,
)
from grata.plots import dice_stream_png
from grata.specs import folder_name

REPORT_FILE = "report.html"
DEFAULT_VCDR_THRESHOLD = 0.6  # a common referral cue for glaucoma suspicion
ADAPT_THUMB_PX = 96
SERVE_THUMB_PX = 112
DICE_COLUMNS = (("dice_od", "OD"), ("dice_oc", "OC"), ("dice_mean", "mean"))
SCALE_LEGEND = ("Scale: the disc-scale stage's decision (as-given, per-image, stream or "
                "fallback-none), the factor (crop height / box side: above 1 magnifies) and "
                "the box x0,y0,x1,y1 in the crop's pixels the model saw (drawn on the "
                "overlay), then why where it says.")
# Keys of report.json the page shows in their own sections; any other key is listed as is.
_SHOWN = {"results", "mean_over_targets", "config"}


# ------------------------------------------------------------------------ table logic

def best_per_column(values: dict[str, float | None], digits: int = 2) -> set[str]:
    """The methods with the highest value of one column, compared as displayed (rounded
    to `digits`), so two methods that show the same number are both marked. Missing or
    non-finite values are never best."""
    shown = {m: round(v, digits) for m, v in values.items() if is_number(v)}
    if not shown:
        return set()
    top = max(shown.values())
    return {m for m, v in shown.items() if v == top}


def paper_table(report: dict) -> dict:
    """The paper's table of a report: targets and methods in report order, the value of
    every (method, column) with column = (target or None for the mean over targets,
    metric), and the best methods per column."""
    rows = report.get("results", [])
    targets = list(dict.fromkeys(r["target"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_pair = {(r["method"], r["target"]): r for r in rows}
    overall = report.get("mean_over_targets", {})
    columns = [(t, k) for t in targets for k, _ in DICE_COLUMNS]
    columns += [(None, k) for k, _ in DICE_COLUMNS]
    value = {}
    for m in methods:
        for t, k in columns:
            src = overall.get(m, {}) if t is None else by_pair.get((m, t), {})
            value[(m, (t, k))] = src.get(k)
    best = {c: best_per_column({m: value[(m, c)] for m in methods}) for c in columns}
    return {"targets": targets, "methods": methods, "columns": columns, "value": value,
            "best": best}


def _sort_value(x) -> float:
    return x if is_number(x) else math.inf


def worst_first(report: dict) -> list[dict]:
    """Every scored image of every (method, target), lowest mean Dice first (images
    without a Dice last); ties keep report order. Each row gains `method` and `target`."""
    rows = [dict(img, method=r["method"], target=r["target"])
            for r in report.get("results", []) for img in r.get("images", [])]
    return sorted(rows, key=lambda i: _sort_value(i.get("dice_mean")))


def vcdr_flag(vcdr, threshold: float = DEFAULT_VCDR_THRESHOLD) -> bool:
    """True when a vCDR is strictly above the referral threshold (a missing one is not)."""
    return is_number(vcdr) and vcdr > threshold


def overlay_path(run_dir: Path, method: str, target: str, row: dict) -> Path:
    """Where `grata adapt --overlays` wrote the overlay of a per-image row."""
    stem = Path(str(row.get("file", ""))).stem
    return (run_dir / "overlays" / folder_name(method) / target
            / f"{int(row.get('index', 0)):04d}_{stem}.png")


def scale_decision(rec) -> tuple[str, float | None]:
    """The disc-scale stage's decision of one image (its record's ``scale``: how, factor,
    box, reason) as one line of text, and the factor to sort by; ("", None) without one."""
    if not isinstance(rec, dict):
        return "", None
    factor = rec.get("factor")
    text = str(rec.get("how", "?"))
    if is_number(factor):
        text += f" \u00d7{factor:.2f}"
    box = rec.get("box")
    if isinstance(box, list) and len(box) == 4:
        text += " box " + ",".join(str(v) for v in box)
    if rec.get("reason"):
        text += f": {rec['reason']}"
    return text, factor if is_number(factor) else None


def _scale_cell(rec) -> str:
    text, factor = scale_decision(rec)
    v = repr(float(factor)) if factor is not None else ""
    return f'<td class="t scale" data-v="{esc(v)}">{esc(text)}</td>'


# ------------------------------------------------------------------------- adapt page

def load_report(run_dir) -> dict:
    path = Path(run_dir) / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GrataError(f"{path}: not found (is {run_dir} the --out folder of grata "
                         "adapt?)") from None
    except (OSError, ValueError) as exc:
        raise GrataError(f"{path}: cannot be read as JSON ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise GrataError(f"{path}: not a grata adapt report (no 'results' list)")
    return report


def write_adapt_html(run_dir, *, plots: bool = True) -> Path:
    """Write RUN_DIR/report.html from RUN_DIR/report.json and the overlays beside it.

    `plots=False` leaves the Dice-over-stream plots out (no matplotlib needed); with
    plots and no matplotlib installed this raises a one-line GrataError. Returns the path.
    """
    run_dir = Path(run_dir)
    report = load_report(run_dir)
    try:
        html = render_adapt(report, run_dir, plots=plots)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a hand-edited file
        raise GrataError(f"{run_dir / 'report.json'}: not a grata adapt report "
                         f"({type(exc).__name__}: {exc})") from None
    out = run_dir / REPORT_FILE
    write_atomic(out, html.encode("utf-8"))
    return out


def render_adapt(report: dict, run_dir: Path, *, plots: bool = True) -> str:
    """The adapt page as a string (see `write_adapt_html`)."""
    cfg = report.get("config") or {}
    tab = paper_table(report)
    title = "grata adapt report"
    parts = [f"<h1>{esc(title)}</h1>", _adapt_subtitle(report, cfg, tab)]
    if report.get("complete") is False:
        parts.append('<p class="warn">This run did not finish: the report holds the '
                     "domains completed so far.</p>")
    parts += ['<h2 id="dice">Dice (%) per target domain</h2>', _dice_table(tab),
              ('<p class="legend">Highlighted: best per column (as displayed). Mean over '
              "targets: the mean of the domains' Dice.</p>"),
              '<h2 id="metrics">Other metrics</h2>', _metrics_table(report)]
    if plots:
        parts += ['<h2 id="stream">Dice over the stream</h2>', _stream_plots(report, tab)]
    parts += ['<h2 id="images">Images, worst first</h2>', _image_table(report, run_dir)]
    parts += ['<h2 id="events">Numerical resets</h2>', _events_table(report)]
    parts += ['<h2 id="skipped">Skipped files</h2>', _skipped_table(report)]
    parts += ['<h2 id="config">Configuration</h2>', value_html(cfg)]
    extra = {k: v for k, v in report.items() if k not in _SHOWN}
    if extra:
        parts += ['<h2 id="run">Run</h2>', value_html(extra)]
    parts.append(_generated())
    return page(title, "".join(parts), sortable=True)


def _adapt_subtitle(report: dict, cfg: dict, tab: dict) -> str:
    bits = []
    if cfg.get("source") is not None:
        bits.append(f"source {cfg['source']}")
    bits.append(f"{len(tab['targets'])} target domain(s), {len(tab['methods'])} method(s)")
    for key in ("protocol", "engine", "device", "arch", "size", "seed"):
        if cfg.get(key) is not None:
            bits.append(f"{key} {cfg[key]}")
    n = sum(r.get("n_images", 0) or 0 for r in report.get("results", []))
    bits.append(f"{n} scored image(s) over all methods")
    if is_number(report.get("elapsed_s")):
        bits.append(f"{report['elapsed_s']:.0f} s")
    return f'<p class="sub">{esc(" · ".join(bits))}</p>'


def _dice_table(tab: dict) -> str:
    head1 = '<th rowspan="2">method</th>' + "".join(
        f'<th colspan="3">{esc(t)}</th>' for t in tab["targets"]) + \
        '<th colspan="3">mean over targets</th>'
    head2 = "".join(f"<th>{esc(label)}</th>" for _ in range(len(tab["targets"]) + 1)
                    for _, label in DICE_COLUMNS)
    body = []
    for m in tab["methods"]:
        cells = [text_cell(m, "t")]
        for c in tab["columns"]:
            cells.append(num_cell(tab["value"][(m, c)], 2,
                                  "best" if m in tab["best"][c] else ""))
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table id="dice-table" class="paper"><thead><tr>{head1}'
            f'</tr><tr>{head2}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _metrics_table(report: dict) -> str:
    rows = []
    for r in report.get("results", []):
        t = r.get("time_per_image_s")
        rows.append("<tr>" + text_cell(r["target"], "t") + text_cell(r["method"], "t")
                    + num_cell(r.get("n_images"), 0) + num_cell(r.get("vcdr_mae"), 3)
                    + num_cell(r.get("asd_od"), 2) + num_cell(r.get("asd_oc"), 2)
                    + num_cell(t * 1e3 if is_number(t) else None, 1)
                    + num_cell(len(r.get("skipped") or []), 0)
                    + num_cell(len(r.get("events") or []), 0) + "</tr>")
    return table(["target", "method", "images", "vCDR MAE", "ASD OD (px)", "ASD OC (px)",
                  "median ms / image", "skipped", "resets"], rows, "sortable")


def _stream_plots(report: dict, tab: dict) -> str:
    by_pair = {(r["method"], r["target"]): r for r in report.get("results", [])}
    figs = []
    for t in tab["targets"]:
        series = {m: [i.get("dice_mean") for i in by_pair[(m, t)].get("images", [])]
                  for m in tab["methods"] if (m, t) in by_pair}
        uri = data_uri(dice_stream_png(t, series), "image/png")
        figs.append(img_tag(uri, f"{t}: Dice over the stream", "plot"))
    return f'<div class="plots">{"".join(figs)}</div>'


def _image_table(report: dict, run_dir: Path) -> str:
    rows = worst_first(report)
    if not rows:
        return "<p>No scored images.</p>"
    have_overlays = (run_dir / "overlays").is_dir()
    scaled = any("scale" in i for i in rows)  # --scale auto: each image's decision
    body = []
    for rank, i in enumerate(rows, 1):
        m, t = i["method"], i["target"]
        if have_overlays:
            alt = f"{m} on {t}: {i.get('file', '')}"
            thumb = img_tag(thumbnail_uri(overlay_path(run_dir, m, t, i), ADAPT_THUMB_PX), alt)
        else:
            thumb = '<span class="missing">\u2013</span>'
        body.append(
            "<tr>" + num_cell(rank, 0) + f"<td>{thumb}</td>"
            + (_scale_cell(i.get("scale")) if scaled else "") + text_cell(t, "t")
            + text_cell(i.get("file", ""), "t") + text_cell(m, "t") + num_cell(i.get("dice_od")) + num_cell(i.get("dice_oc"))
            + num_cell(i.get("dice_mean")) + num_cell(i.get("vcdr_pred"), 3)
            + num_cell(i.get("vcdr_gt"), 3) + num_cell(i.get("vcdr_error"), 3)
            + num_cell(i.get("asd_od")) + num_cell(i.get("asd_oc"))
            + num_cell(i["time_s"] * 1e3 if is_number(i.get("time_s")) else None, 1) + "</tr>")
    note = ("Overlay: prediction filled (disc green, cup blue), ground truth outlined (disc "
            "yellow, cup magenta)." if have_overlays else
            "No overlays in this run (grata adapt --overlays writes them).")
    if scaled:
        note += " " + SCALE_LEGEND
    return (f'<p class="legend">{esc(note)} Click a column header to sort.</p>'
            + table(["#", "overlay", *(["scale"] if scaled else []), "target", "image",
                     "method", "Dice OD", "Dice OC", "Dice mean", "vCDR pred", "vCDR truth",
                     "vCDR error", "ASD OD", "ASD OC", "ms"], body, "sortable"))


def _events_table(report: dict) -> str:
    rows = []
    for r in report.get("results", []):
        for e in r.get("events") or []:
            other = {k: v for k, v in e.items()
                     if k not in ("image", "event", "action", "target")}
            rows.append("<tr>" + text_cell(e.get("target", r["target"]), "t")
                        + text_cell(r["method"], "t") + num_cell(e.get("image"), 0)
                        + text_cell(e.get("event", ""), "t") + text_cell(e.get("action", ""), "t")
                        + f'<td class="t">{value_html(other) if other else ""}</td></tr>')
    if not rows:
        return "<p>None: no step was undone.</p>"
    return table(["target", "method", "image #", "event", "action", "details"], rows,
                 "sortable")


def _skipped_table(report: dict) -> str:
    # Every method skips the same unreadable file: list it once per domain.
    seen = {}
    for r in report.get("results", []):
        for s in r.get("skipped") or []:
            seen.setdefault((r["target"], s.get("file", ""), s.get("reason", "")), None)
    if not seen:
        return "<p>None: every file of the streams was read.</p>"
    rows = ["<tr>" + text_cell(t, "t") + text_cell(f, "t") + text_cell(why, "t") + "</tr>"
            for t, f, why in seen]
    return table(["target", "file", "reason"], rows, "sortable")


def _generated() -> str:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f'<p class="legend">Page written {esc(now)}.</p>'


# ------------------------------------------------------------------------- serve page

def serve_records(outbox) -> tuple[list[dict], list[tuple[str, str]]]:
    """The records of a serve outbox in arrival order (the time each was written, then
    the file's modification time and name), and (file, problem) for JSON files that are
    not readable records."""
    outbox = Path(outbox)
    found, problems = [], []
    for p in outbox.glob("*.json"):
        if p.name.startswith("."):
            continue
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
            mtime = p.stat().st_mtime_ns
        except (OSError, ValueError) as exc:
            problems.append((p.name, f"cannot be read ({type(exc).__name__})"))
            continue
        if not is_serve_record(rec):
            problems.append((p.name, "not a grata serve record"))
            continue
        found.append((str(rec.get("written") or ""), mtime, p.name, rec))
    found.sort(key=lambda x: x[:3])
    return [r for *_, r in found], sorted(problems)


def is_serve_record(rec) -> bool:
    return isinstance(rec, dict) and "image" in rec and "disc_area_px" in rec


def write_serve_html(outbox, *, vcdr_threshold: float = DEFAULT_VCDR_THRESHOLD) -> Path:
    """Write OUTBOX/report.html from the serve records there (atomically: a page kept
    open shows the old or the new version on reload, never a part). Returns the path."""
    outbox = Path(outbox)
    if not outbox.is_dir():
        raise GrataError(f"outbox {outbox} is not a folder")
    if not vcdr_threshold > 0:
        raise GrataError(f"the vCDR threshold must be positive, not {vcdr_threshold}")
    records, problems = serve_records(outbox)
    html = render_serve(records, outbox, vcdr_threshold=vcdr_threshold, problems=problems)
    out = outbox / REPORT_FILE
    write_atomic(out, html.encode("utf-8"))
    return out


def _confidence(rec: dict) -> tuple[float | None, str]:
    """(mean entropy of the adaptation step, every loss as text): the model's
    uncertainty on this photograph, from what the record carries."""
    losses = rec.get("losses") or {}
    text = ", ".join(f"{k} {fmt(v, 4)}" for k, v in losses.items())
    return losses.get("loss_ent"), text


def render_serve(records: list[dict], outbox: Path, *,
                 vcdr_threshold: float = DEFAULT_VCDR_THRESHOLD,
                 problems: list[tuple[str, str]] = ()) -> str:
    """The serve page as a string (see `write_serve_html`)."""
    title = "grata serve report"
    flagged = sum(vcdr_flag(r.get("vcdr"), vcdr_threshold) for r in records)
    n_resets = sum(len(r.get("resets") or []) for r in records)
    last = records[-1] if records else {}
    bits = [f"{len(records)} photograph(s)",
            f"{flagged} with vCDR above {vcdr_threshold:g}", f"{n_resets} guard reset(s)"]
    for key in ("method", "predictor", "precision", "model_size"):
        if last.get(key) is not None:
            bits.append(f"{key} {last[key]}")
    parts = [f"<h1>{esc(title)}</h1>", f'<p class="sub">{esc(" · ".join(bits))}</p>',
             ('<p class="legend">One row per photograph in arrival order (reload to see new '
             f"ones). Flag: vertical cup-to-disc ratio above {esc(f'{vcdr_threshold:g}')}. "
             "Confidence: the mean pixel entropy of the prediction at the adaptation step "
             "(lower is more confident). Overlay: disc green, cup blue. Times in UTC.</p>")]
    scaled = any("scale" in r for r in records)  # --scale auto: each image's decision
    if scaled:
        parts.append(f'<p class="legend">{esc(SCALE_LEGEND)}</p>')
    body = [_serve_row(n, r, outbox, vcdr_threshold, scaled)
            for n, r in enumerate(records, 1)]
    if body:
        parts.append(table(
            ["#", "photograph", "overlay", *(["scale"] if scaled else []), "disc px",
             "cup px", "vCDR", "entropy", "guards", "adapt ms", "predict ms", "total ms",
             "theta", "written"], body, "sortable"))
    else:
        parts.append("<p>No photograph served yet.</p>")
    if problems:
        rows = ["<tr>" + text_cell(f, "t") + text_cell(why, "t") + "</tr>"
                for f, why in problems]
        parts += ['<h2 id="unread">Files not shown</h2>', table(["file", "problem"], rows)]
    parts.append(_generated())
    return page(title, "".join(parts), sortable=True)


def _serve_row(n: int, r: dict, outbox: Path, threshold: float, scaled: bool = False) -> str:
    flag = vcdr_flag(r.get("vcdr"), threshold)
    files = r.get("files") or {}
    name = str(r.get("image", ""))
    overlay = files.get("overlay")
    thumb = None
    if isinstance(overlay, str) and Path(overlay).name == overlay:  # beside the record only
        thumb = thumbnail_uri(outbox / overlay, SERVE_THUMB_PX)
    ent, losses = _confidence(r)
    guards = "; ".join(f"{g.get('reason', '?')}: {g.get('action', '')}"
                       for g in r.get("resets") or [])
    gate = r.get("gate") if isinstance(r.get("gate"), dict) else None
    if gate and gate.get("chosen") == "source":  # the safety gate served the source model
        guards = "; ".join(x for x in (guards, f"gate: source model served "
                                               f"({gate.get('reason', '?')})") if x)
    if r.get("recovered"):
        guards = "; ".join(x for x in (guards, "recovered after a restart (prediction only)")
                           if x)
    t = r.get("timings_ms") or {}
    total = sum(v for v in t.values() if is_number(v)) if t else None
    theta = f"v{r.get('theta_version', '?')}"
    if is_number(r.get("theta_drift")):
        theta += f", drift {r['theta_drift']:.2g}"
    vcdr = r.get("vcdr")
    badge = f' <span class="badge">&gt; {esc(f"{threshold:g}")}</span>' if flag else ""
    vcdr_cell = (f'<td class="{"flag" if flag else ""}" data-v="'
                 f'{esc(repr(float(vcdr)) if is_number(vcdr) else "")}">{esc(fmt(vcdr, 2))}'
                 f"{badge}</td>")
    written = str(r.get("written", ""))
    return (f'<tr class="{"flag" if flag else ""}">' + num_cell(n, 0) + text_cell(name, "t")
            + f"<td>{img_tag(thumb, name, 'big')}</td>"
            + (_scale_cell(r.get("scale")) if scaled else "")
            + num_cell(r.get("disc_area_px"), 0) + num_cell(r.get("cup_area_px"), 0)
            + vcdr_cell
            + f'<td data-v="{esc(repr(float(ent)) if is_number(ent) else "")}" '
              f'title="{esc(losses)}">{esc(fmt(ent, 4))}</td>'
            + text_cell(guards, "t") + num_cell(t.get("adapt"), 1)
            + num_cell(t.get("predict"), 1) + num_cell(total, 1)
            + text_cell(theta, "t")
            + f'<td class="t" data-v="{esc(written)}" title="{esc(written)}">'
              f"{esc(written[11:19] or written)}</td></tr>")


# -------------------------------------------------------------------------- either one

def write_report(path, *, vcdr_threshold: float = DEFAULT_VCDR_THRESHOLD,
                 plots: bool = True) -> Path:
    """report.html for a folder: an adapt run (it holds report.json) or a serve outbox (it
    holds serve records). `path` may also be the run's report.json. Returns the page."""
    path = Path(path)
    if path.is_file() and path.name == "report.json":
        path = path.parent
    if not path.is_dir():
        raise GrataError(f"{path}: no such folder")
    if (path / "report.json").is_file():
        return write_adapt_html(path, plots=plots)
    if any(is_serve_record(_read_json(p)) for p in path.glob("*.json")
           if not p.name.startswith(".")):
        return write_serve_html(path, vcdr_threshold=vcdr_threshold)
    raise GrataError(f"{path}: neither an adapt run (no report.json) nor a serve outbox "
                     "(no image records)")


def _read_json(p: Path):
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None

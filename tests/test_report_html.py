"""The HTML report: table logic against hand-computed values, escaping of hostile names, and
the pages of a real adapt run and a real serve run opened in headless Chromium (no network):
the tables hold report.json's / the records' numbers, every image loads, nothing external,
sorting works, a tablet-width window does not scroll sideways, a screenshot is written."""

import csv
import json
import math
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grata.cli import main
from grata.errors import GrataError
from grata.models import ResUnet, save_checkpoint
from grata.report_html import (
    best_per_column,
    paper_table,
    render_adapt,
    render_serve,
    vcdr_flag,
    worst_first,
    write_adapt_html,
    write_report,
    write_serve_html,
)
from grata.synth import SOURCE_DOMAIN, TARGET_DOMAINS, generate

HOSTILE = 'eye <img src=x onerror=alert(1)> & "q\'\n<script>bad() &amp;.png'
TARGETS = list(TARGET_DOMAINS[:2])


# ---------------------------------------------------------------------- DOM reading

class Dom(HTMLParser):
    """What a test needs of a page: tables (rows of cells), images, URL-bearing attributes,
    the root element's attributes, the text of <script> elements."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables, self.images, self.links, self.scripts = {}, [], [], []
        self.root, self._table, self._row, self._cell, self._in_script = {}, None, None, None, 0
        self._stack = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "html":
            self.root = a
        for k in ("src", "href", "action", "poster", "srcset", "formaction"):
            if k in a:
                self.links.append(a[k])
        if tag == "img":
            self.images.append(a)
        if tag == "script":
            self._in_script += 1
            self.scripts.append("")
        if tag == "table":
            self._stack.append((self._table, self._row, self._cell))
            self._row = self._cell = None
            key = a.get("id") or f"table{len(self.tables)}"
            self._table = self.tables.setdefault(key, {"class": a.get("class", ""),
                                                       "head": [], "body": []})
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = {"tag": tag, "text": "", "class": a.get("class", ""),
                          "v": a.get("data-v"), "imgs": []}
        if tag == "img" and self._cell is not None:
            self._cell["imgs"].append(a)

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script -= 1
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            part = "head" if all(c["tag"] == "th" for c in self._row) else "body"
            self._table[part].append(self._row)
            self._row = None
        elif tag == "table":
            self._table, self._row, self._cell = self._stack.pop() if self._stack else (
                None, None, None)

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
        if self._cell is not None:
            self._cell["text"] += data


def f2(x, digits=2):
    """The page's number format, written independently of the code under test."""
    return "\u2013" if x is None or (isinstance(x, float) and math.isnan(x)) \
        else f"{x:.{digits}f}"


def assert_nothing_external(text: str, dom: Dom):
    assert not re.search(r"(?i)\b(https?|ftp|wss?|file):", text)
    assert not re.search(r"(?i)url\s*\(|@import", text)
    for link in dom.links:
        assert link.startswith(("data:image/", "#")), link[:80]


# ------------------------------------------------------------------------- the browser

def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed: the browser tests must run in CI "
                    "(.ci/run installs the Debian package chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium): page not opened "
                "in a browser")


# Appended to a copy of the page only: marks each image loaded or not, records the
# resources the page fetched, the window and document widths, then optionally clicks a
# sortable header. Runs on `load`, i.e. after every image has loaded or failed.
PROBE = """<script>window.addEventListener("load",()=>{
for(const i of document.images)i.dataset.loaded=String(i.complete&&i.naturalWidth>0);
const d=document.documentElement;
d.dataset.resources=JSON.stringify(performance.getEntriesByType("resource").map(e=>e.name));
d.dataset.inner=String(window.innerWidth);d.dataset.scroll=String(d.scrollWidth);
const want=%s;for(const [label,n] of want){const th=[...document.querySelectorAll(
"table.sortable thead th")].find(t=>t.textContent===label);for(let k=0;k<n;k++)th.click();}
d.dataset.probe="done";});</script>"""


def browse(page: Path, tmp: Path, width: int = 1280, clicks=(), screenshot: Path | None = None,
           height: int = 1600) -> str:
    """Open a copy of `page` (with the probe) in headless Chromium with no network; return
    the DOM after load (and write a screenshot when asked)."""
    text = page.read_text(encoding="utf-8")
    assert text.count("</body>") == 1
    probed = tmp / f"probed_{width}.html"
    probed.write_text(text.replace("</body>", PROBE % json.dumps(list(clicks)) + "</body>"),
                      encoding="utf-8")
    args = [chromium(), "--headless=new", "--disable-gpu", "--no-sandbox",
            "--no-first-run", "--disable-extensions", "--disable-background-networking",
            "--disable-sync", "--disable-component-update", f"--user-data-dir={tmp / 'chr'}",
            # no network: every host resolves to nothing and any proxied request fails
            "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
            f"--window-size={width},{height}", "--hide-scrollbars",
            "--virtual-time-budget=5000"]
    dom = subprocess.run(args + ["--dump-dom", probed.as_uri()], capture_output=True,
                         text=True, timeout=120, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    if screenshot is not None:
        # the real page (no probe) is what the screenshot shows
        shot = subprocess.run(args + [f"--screenshot={screenshot}", page.as_uri()],
                              capture_output=True, text=True, timeout=120, check=False)
        assert shot.returncode == 0, shot.stderr[-2000:]
    return dom.stdout


def check_loaded(dom: Dom):
    assert dom.root.get("data-probe") == "done", "the probe did not run"
    assert json.loads(dom.root["data-resources"]) == []  # nothing was fetched
    assert dom.images, "no image on the page"
    for img in dom.images:
        assert img["src"].startswith("data:image/"), img["src"][:60]
        assert img.get("data-loaded") == "true", img.get("alt")


def check_screenshot(path: Path, width: int):
    im = Image.open(path)
    assert im.format == "PNG" and im.size[0] == width
    grey = np.asarray(im.convert("L"), np.float32)
    assert grey.std() > 10  # text, tables and images, not a blank page


# ------------------------------------------------------------------------ a real run

@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A small synthetic benchmark with one hostile file name, one truncated image, and an
    untrained edge checkpoint."""
    root = tmp_path_factory.mktemp("report_bench")
    data = root / "data"
    generate(data, seed=5, n_source=(1, 1), n_target=(2, 1), size=96, progress=False)
    save_checkpoint(ResUnet("edge"), root / "edge.pt")
    # rename the first test image of the first target to a hostile name, in the CSV too
    csv_path = data / f"{TARGETS[0]}_test.csv"
    rows = list(csv.reader(csv_path.open(newline="")))
    old = data / rows[1][0]
    new = old.with_name(HOSTILE)
    old.rename(new)
    rows[1][0] = str(new.relative_to(data))
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    # a truncated image in the second target: skipped, with its reason
    bad = min((data / TARGETS[1]).rglob("*train_0000.png"))
    bad.write_bytes(bad.read_bytes()[:100])
    return root


@pytest.fixture(scope="module")
def adapt_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_run") / "run"
    rc = main(["adapt", "--data", str(bench / "data"), "--source", SOURCE_DOMAIN,
               "--targets", ",".join(TARGETS), "--checkpoint", str(bench / "edge.pt"),
               "--arch", "edge", "--size", "64", "--engine", "torch", "--quiet",
               "--methods", "source,bn,grata", "--overlays", "--out", str(out)])
    assert rc == 0
    return out


def test_adapt_page_in_a_browser_holds_the_reports_numbers(adapt_run, tmp_path):
    report = json.loads((adapt_run / "report.json").read_text())
    page = write_report(adapt_run)
    assert page == adapt_run / "report.html"
    text = page.read_text(encoding="utf-8")
    assert_nothing_external(text, Dom(text))
    shot = tmp_path / "adapt.png"
    dom = Dom(browse(page, tmp_path, clicks=[["vCDR error", 1]], screenshot=shot))
    check_loaded(dom)
    check_screenshot(shot, 1280)
    assert_nothing_external(text, dom)

    # the paper's table: every cell is report.json's number, best per column marked
    methods = list(dict.fromkeys(r["method"] for r in report["results"]))
    pair = {(r["method"], r["target"]): r for r in report["results"]}
    table = dom.tables["dice-table"]
    assert [c["text"] for c in table["head"][0]][1:] == TARGETS + ["mean over targets"]
    assert [row[0]["text"] for row in table["body"]] == methods
    for row in table["body"]:
        m = row[0]["text"]
        want = [pair[(m, t)][k] for t in TARGETS for k in ("dice_od", "dice_oc", "dice_mean")]
        want += [report["mean_over_targets"][m][k] for k in ("dice_od", "dice_oc", "dice_mean")]
        assert [c["text"] for c in row[1:]] == [f2(v) for v in want]
    for col in range(1, 3 * (len(TARGETS) + 1) + 1):
        shown = [float(row[col]["text"]) for row in table["body"]]
        marked = [("best" in row[col]["class"].split()) for row in table["body"]]
        assert marked == [v == max(shown) for v in shown], col

    # per-image rows: one per scored image and method, each with its numbers and overlay;
    # the probe clicked "vCDR error" once: ascending vCDR error
    images = next(t for t in dom.tables.values()
                  if t["head"] and t["head"][0][0]["text"] == "#" and
                  "Dice mean" in [c["text"] for c in t["head"][0]])
    head = [c["text"] for c in images["head"][0]]
    rows = [{h: c for h, c in zip(head, r)} for r in images["body"]]
    by_key = {(r["target"], i["file"], r["method"]): i
              for r in report["results"] for i in r["images"]}
    assert len(rows) == len(by_key) == sum(r["n_images"] for r in report["results"])
    assert {(r["target"]["text"], r["image"]["text"], r["method"]["text"]) for r in rows} \
        == set(by_key)
    for r in rows:
        i = by_key[(r["target"]["text"], r["image"]["text"], r["method"]["text"])]
        assert r["Dice OD"]["text"] == f2(i["dice_od"])
        assert r["Dice mean"]["text"] == f2(i["dice_mean"])
        assert r["vCDR error"]["text"] == f2(i["vcdr_error"], 3)
        (thumb,) = r["overlay"]["imgs"]
        assert thumb["data-loaded"] == "true"
    errors = [float(r["vCDR error"]["v"]) for r in rows]
    assert errors == sorted(errors)
    assert any(HOSTILE in r["image"]["text"] for r in rows)  # shown as text, verbatim

    # the skipped file and its reason, as report.json has them
    skipped = {(r["target"], s["file"], s["reason"]) for r in report["results"]
               for s in r["skipped"]}
    assert len(skipped) == 1
    table = next(t for t in dom.tables.values()
                 if t["head"] and [c["text"] for c in t["head"][0]] == ["target", "file",
                                                                        "reason"])
    assert {tuple(c["text"] for c in row) for row in table["body"]} == skipped
    # two plots (one per target domain) and one thumbnail per row
    assert len([i for i in dom.images if "plot" in i.get("class", "")]) == len(TARGETS)
    assert len(dom.images) == len(rows) + len(TARGETS)
    # the configuration, generically: every key and value of report.json's config is shown
    shown = {(row[0]["text"], row[1]["text"]) for t in dom.tables.values() for row in t["body"]
             if len(row) == 2 and row[0]["tag"] == "th"}
    def leaves(d):  # nested objects are nested tables: their leaves are rows too
        for key, value in d.items():
            if isinstance(value, dict) and value:
                yield from leaves(value)
            else:
                yield key, value

    for key, value in leaves(report["config"]):
        want = ("empty" if value == {} else ", ".join(map(str, value))
                if isinstance(value, list) else "null" if value is None else str(value))
        assert (key, want) in shown, key


def test_adapt_page_fits_a_tablet_and_prints(adapt_run, tmp_path):
    page = write_adapt_html(adapt_run)
    dom = Dom(browse(page, tmp_path, width=768))
    check_loaded(dom)
    # wide tables scroll inside their own box: the page itself does not scroll sideways
    assert int(dom.root["data-scroll"]) <= int(dom.root["data-inner"]) == 768
    pdf = tmp_path / "report.pdf"
    out = subprocess.run([chromium(), "--headless=new", "--disable-gpu", "--no-sandbox",
                          f"--user-data-dir={tmp_path / 'chr'}", "--proxy-server=127.0.0.1:9",
                          "--no-pdf-header-footer", f"--print-to-pdf={pdf}", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-") and len(re.findall(rb"/Type\s*/Page\b", data)) >= 2


@pytest.fixture(scope="module")
def served(bench, edge64, tmp_path_factory):
    """A real grata serve run over six photographs (one with a hostile name), arriving in
    a known order."""
    from grata.runtime.adaptive import AdaptiveModel
    from grata.runtime.inbox import serve
    root = tmp_path_factory.mktemp("report_serve")
    inbox, outbox = root / "inbox", root / "outbox"
    inbox.mkdir()
    sources = sorted((bench / "data" / TARGETS[0]).rglob("image/*.png"))
    sources += sorted((bench / "data" / SOURCE_DOMAIN).rglob("image/*.png"))
    names = [f"eye{k}.png" for k in range(5)] + [HOSTILE]
    base = time.time_ns() - 10**12
    for k, name in enumerate(names):
        shutil.copy(sources[k % len(sources)], inbox / name)
        os.utime(inbox / name, ns=(base + k * 10**7, base + k * 10**7))
    with AdaptiveModel(edge64[1], None, predictor="onnxruntime", device="cpu", threads=1) as s:
        counts = serve(inbox, outbox, s, once=True, settle_s=0.1, poll_s=0.02, log=None)
    assert counts["served"] == len(names)
    return outbox, names


def test_serve_page_in_a_browser_lists_photographs_in_arrival_order(served, tmp_path):
    outbox, names = served
    records = {json.loads(p.read_text())["image"]: json.loads(p.read_text())
               for p in outbox.glob("*.json")}
    # a threshold between the records' vCDRs, so both flagged and unflagged rows exist
    vcdrs = sorted(r["vcdr"] for r in records.values() if r["vcdr"] is not None)
    threshold = (vcdrs[0] + vcdrs[-1]) / 2 if vcdrs[0] < vcdrs[-1] else 0.6
    page = write_serve_html(outbox, vcdr_threshold=threshold)
    assert page == outbox / "report.html"
    text = page.read_text(encoding="utf-8")
    assert_nothing_external(text, Dom(text))
    shot = tmp_path / "serve.png"
    dom = Dom(browse(page, tmp_path, screenshot=shot))
    check_loaded(dom)
    check_screenshot(shot, 1280)
    (table,) = [t for t in dom.tables.values() if "sortable" in t["class"]]
    head = [c["text"] for c in table["head"][0]]
    rows = [{h: c for h, c in zip(head, r)} for r in table["body"]]
    assert [r["photograph"]["text"] for r in rows] == names  # arrival order, verbatim
    assert [r["#"]["text"] for r in rows] == [str(k) for k in range(1, len(names) + 1)]
    for r in rows:
        rec = records[r["photograph"]["text"]]
        assert r["disc px"]["text"] == str(rec["disc_area_px"])
        assert r["cup px"]["text"] == str(rec["cup_area_px"])
        flagged = rec["vcdr"] is not None and rec["vcdr"] > threshold
        assert r["vCDR"]["text"].startswith(f2(rec["vcdr"]))
        assert ("flag" in r["vCDR"]["class"].split()) == flagged
        assert r["entropy"]["text"] == f2(rec["losses"]["loss_ent"], 4)
        assert r["adapt ms"]["text"] == f2(rec["timings_ms"]["adapt"], 1)
        assert r["predict ms"]["text"] == f2(rec["timings_ms"]["predict"], 1)
        (img,) = r["overlay"]["imgs"]
        assert img["data-loaded"] == "true"
    assert any(rec["vcdr"] is not None and rec["vcdr"] > threshold for rec in records.values())
    # the hostile name became text, not markup: no element from it exists
    assert not any(i["src"] == "x" for i in dom.images)
    assert all("bad()" not in s for s in dom.scripts)


# ----------------------------------------------------------- table logic, by hand

def test_best_per_column_compares_displayed_values():
    assert best_per_column({"a": 80.004, "b": 80.001, "c": 79.0}) == {"a", "b"}  # both 80.00
    assert best_per_column({"a": 80.006, "b": 80.001}) == {"a"}  # 80.01 > 80.00
    assert best_per_column({"a": None, "b": math.nan, "c": 1.0}) == {"c"}
    assert best_per_column({"a": None}) == set()


def hand_report():
    def img(i, d, v=0.1):
        return {"index": i, "file": f"T/{i}.png", "dice_od": d and d + 1, "dice_oc": d and d - 1,
                "dice_mean": d, "vcdr_error": v, "time_s": 0.01}
    results = [
        {"method": "source", "target": "A", "n_images": 2, "dice_od": 90.0, "dice_oc": 70.0,
         "dice_mean": 80.0, "images": [img(1, 81.0), img(2, 79.0)], "skipped": [],
         "events": []},
        {"method": "grata", "target": "A", "n_images": 2, "dice_od": 91.0, "dice_oc": 69.0,
         "dice_mean": 80.0, "images": [img(1, 85.0), img(2, None)], "skipped": [],
         "events": [{"image": 2, "event": "non-finite", "action": "restored", "target": "A"}]},
        {"method": "source", "target": "B", "n_images": 1, "dice_od": 50.0, "dice_oc": 40.0,
         "dice_mean": 45.0, "images": [img(1, 45.0)], "skipped": [], "events": []},
        {"method": "grata", "target": "B", "n_images": 1, "dice_od": 60.0, "dice_oc": 30.0,
         "dice_mean": 45.0, "images": [img(1, 70.0)], "skipped": [], "events": []},
    ]
    return {"format_version": 1, "complete": True, "config": {"seed": 3}, "results": results,
            "mean_over_targets": {
                "source": {"dice_od": 70.0, "dice_oc": 55.0, "dice_mean": 62.5},
                "grata": {"dice_od": 75.5, "dice_oc": 49.5, "dice_mean": 62.5}}}


def test_paper_table_by_hand():
    tab = paper_table(hand_report())
    assert tab["targets"] == ["A", "B"] and tab["methods"] == ["source", "grata"]
    best = tab["best"]
    assert best[("A", "dice_od")] == {"grata"} and best[("A", "dice_oc")] == {"source"}
    assert best[("A", "dice_mean")] == {"source", "grata"}  # a tie marks both
    assert best[("B", "dice_od")] == {"grata"} and best[("B", "dice_oc")] == {"source"}
    assert best[(None, "dice_od")] == {"grata"} and best[(None, "dice_oc")] == {"source"}
    assert tab["value"][("grata", (None, "dice_od"))] == 75.5


def test_worst_first_by_hand():
    order = [(r["method"], r["target"], r["index"]) for r in worst_first(hand_report())]
    # 45 (source B), 70 (grata B), 79, 81 (source A), 85 (grata A), then the missing Dice
    assert order == [("source", "B", 1), ("grata", "B", 1), ("source", "A", 2),
                     ("source", "A", 1), ("grata", "A", 1), ("grata", "A", 2)]


def test_vcdr_flag_is_strictly_above_the_threshold():
    assert not vcdr_flag(0.6) and vcdr_flag(0.6000001) and not vcdr_flag(0.59)
    assert not vcdr_flag(None) and not vcdr_flag(math.nan)
    assert vcdr_flag(0.6, threshold=0.5) and not vcdr_flag(0.7, threshold=0.7)
    assert not vcdr_flag(3 / 5)  # a ratio of integers equal to the threshold is not above


def serve_record(name, vcdr, written, resets=()):
    return {"format_version": 1, "image": name, "key": f"{name}.abc", "method": "grata",
            "disc_area_px": 100, "cup_area_px": 30, "vcdr": vcdr,
            "timings_ms": {"load": 1.0, "adapt": 20.0, "predict": 2.0, "write": 1.0},
            "theta_version": 1, "theta_drift": 0.01, "losses": {"loss_ent": 0.25},
            "resets": list(resets), "recovered": False, "written": written,
            "files": {"overlay": "none.png"}}


def test_serve_rows_flags_and_guards_by_hand(tmp_path):
    recs = [serve_record("a.png", 0.6, "2026-01-01T10:00:00.000+00:00"),
            serve_record("b.png", 0.75, "2026-01-01T10:00:01.000+00:00",
                         [{"reason": "drift", "action": "restored the last good theta"}]),
            serve_record("c.png", None, "2026-01-01T10:00:02.000+00:00")]
    recs[2]["gate"] = {"chosen": "source", "reason": "source agrees better"}
    recs[0]["gate"] = {"chosen": "adapted", "reason": "kept"}
    dom = Dom(render_serve(recs, tmp_path))
    (table,) = dom.tables.values()
    head = [c["text"] for c in table["head"][0]]
    rows = [{h: c for h, c in zip(head, r)} for r in table["body"]]
    assert ["flag" in r["vCDR"]["class"] for r in rows] == [False, True, False]
    assert rows[1]["guards"]["text"] == "drift: restored the last good theta"
    assert rows[2]["guards"]["text"] == "gate: source model served (source agrees better)"
    assert rows[0]["guards"]["text"] == ""  # the gate kept the adapted prediction
    assert rows[0]["total ms"]["text"] == "24.0" and rows[2]["vCDR"]["text"] == "\u2013"
    assert rows[0]["overlay"]["imgs"] == []  # a missing overlay file is said, not broken


SCALED = {"box": [22, 25, 102, 105], "factor": 2.0, "how": "per-image", "n_forward": 3,
          "reason": "", "confidence": 0.99}
FALLBACK = {"box": [0, 0, 160, 160], "factor": 1.0, "how": "fallback-none", "n_forward": 0,
            "reason": "flat image: nothing to locate", "confidence": 0.0}


def by_head(table) -> list[dict]:
    head = [c["text"] for c in table["head"][0]]
    return [{h: c for h, c in zip(head, r)} for r in table["body"]]


def image_table(page: str) -> dict:
    return next(t for t in Dom(page).tables.values()
                if any(c["text"] == "overlay" for c in t["head"][0]))


def test_adapt_images_show_the_scale_decision_beside_the_overlay(tmp_path):
    report = hand_report()
    plain = image_table(render_adapt(report, tmp_path, plots=False))
    assert "scale" not in [c["text"] for c in plain["head"][0]]  # no --scale auto: none
    a, b = report["results"][0]["images"]  # source on A
    a["scale"], b["scale"] = SCALED, dict(FALLBACK, reason=HOSTILE)
    page = render_adapt(report, tmp_path, plots=False)
    table = image_table(page)
    head = [c["text"] for c in table["head"][0]]
    assert head[:4] == ["#", "overlay", "scale", "target"]  # beside the overlay
    rows = {(r["method"]["text"], r["image"]["text"]): r for r in by_head(table)}
    cell = rows[("source", "T/1.png")]["scale"]
    assert cell["text"] == "per-image \u00d72.00 box 22,25,102,105"
    assert cell["v"] == "2.0"  # sorted by the factor
    # the reason says why, as text (a hostile one too)
    assert rows[("source", "T/2.png")]["scale"]["text"] == \
        "fallback-none \u00d71.00 box 0,0,160,160: " + HOSTILE
    none = rows[("grata", "T/2.png")]["scale"]  # a row without a decision: empty
    assert none["text"] == "" and none["v"] == ""
    assert rows[("source", "T/1.png")]["Dice mean"]["text"] == "81.00"  # columns in place
    assert "Scale: the disc-scale stage&#x27;s decision" in page
    assert not any(i.get("src") == "x" for i in Dom(page).images)


def test_serve_rows_show_the_scale_decision(tmp_path):
    recs = [serve_record("a.png", 0.5, "2026-01-01T10:00:00.000+00:00"),
            serve_record("b.png", 0.5, "2026-01-01T10:00:01.000+00:00")]
    (plain,) = Dom(render_serve(recs, tmp_path)).tables.values()
    assert "scale" not in [c["text"] for c in plain["head"][0]]
    recs[0]["scale"], recs[1]["scale"] = SCALED, FALLBACK
    (table,) = Dom(render_serve(recs, tmp_path)).tables.values()
    assert [c["text"] for c in table["head"][0]][2:5] == ["overlay", "scale", "disc px"]
    rows = by_head(table)
    assert [r["scale"]["text"] for r in rows] == [
        "per-image \u00d72.00 box 22,25,102,105",
        "fallback-none \u00d71.00 box 0,0,160,160: flat image: nothing to locate"]
    assert [r["disc px"]["text"] for r in rows] == ["100", "100"]  # the columns after it


def test_serve_records_are_read_in_arrival_order(tmp_path):
    for name, written in (("z.png", "2026-01-01T10:00:00.000+00:00"),
                          ("a.png", "2026-01-01T10:00:02.000+00:00"),
                          ("m.png", "2026-01-01T10:00:01.000+00:00")):
        (tmp_path / f"{name}.abc.json").write_text(json.dumps(serve_record(name, 0.5, written)))
    (tmp_path / "other.json").write_text("{\"not\": \"a record\"}")
    (tmp_path / "broken.json").write_text("{")
    page = write_report(tmp_path)  # detected as a serve outbox
    dom = Dom(page.read_text())
    first = next(t for t in dom.tables.values() if "sortable" in t["class"])
    assert [row[1]["text"] for row in first["body"]] == ["z.png", "m.png", "a.png"]
    problems = next(t for t in dom.tables.values() if t["head"][0][0]["text"] == "file")
    assert [row[0]["text"] for row in problems["body"]] == ["broken.json", "other.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------ escaping and refusals

def test_hostile_strings_stay_text(tmp_path):
    report = hand_report()
    evil = HOSTILE + "\x00\x07"
    report["results"][0]["images"][0]["file"] = evil
    report["results"][0]["skipped"] = [{"file": evil, "reason": "</td></tr><b>x</b>"}]
    report["config"] = {evil: evil, "nested": {"<k>": ["<v>", 1.5, None]}}
    report["results"][1]["events"][0]["detail"] = "<i>"
    text = render_adapt(report, tmp_path, plots=False)
    dom = Dom(text)
    assert len(dom.scripts) == 1 and "bad()" not in dom.scripts[0]  # only the sort script
    assert not any(i.get("src") == "x" for i in dom.images)
    assert "<b>" not in text and "<i>" not in text and "\x00" not in text
    cleaned = HOSTILE + "\ufffd\ufffd"
    cells = [c["text"] for t in dom.tables.values() for row in t["body"] for c in row]
    assert cleaned in cells and "</td></tr><b>x</b>" in cells
    assert "<v>, 1.5, null" in cells


def test_refusals_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(GrataError, match="no such folder"):
        write_report(tmp_path / "missing")
    with pytest.raises(GrataError, match="neither an adapt run"):
        write_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(GrataError, match="cannot be read as JSON"):
        write_report(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"results": [{"method": "x"}]}))
    with pytest.raises(GrataError, match="not a grata adapt report"):
        write_report(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps(hand_report()))
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    with pytest.raises(GrataError, match=r"pip install 'grata-edge\[report\]'") as exc:
        write_adapt_html(tmp_path)
    assert "\n" not in str(exc.value)
    assert write_adapt_html(tmp_path, plots=False).is_file()  # no matplotlib needed
    outbox = tmp_path / "outbox"  # nor for a serve page (the device has no matplotlib)
    outbox.mkdir()
    (outbox / "a.png.abc.json").write_text(json.dumps(serve_record("a.png", 0.7, "t")))
    assert write_report(outbox) == outbox / "report.html"
    with pytest.raises(GrataError, match="must be positive"):
        write_serve_html(outbox, vcdr_threshold=0)


def test_unfinished_run_says_so(tmp_path):
    report = hand_report()
    assert "did not finish" not in render_adapt(report, tmp_path, plots=False)
    report["complete"] = False
    assert "did not finish" in render_adapt(report, tmp_path, plots=False)


def test_thumbnails_are_downscaled_and_follow_file_changes(tmp_path):
    import base64
    import io

    from grata.html_page import thumbnail_uri
    path = tmp_path / "o.png"
    Image.new("RGB", (300, 150), (255, 0, 0)).save(path)
    first = thumbnail_uri(path, 96)
    im = Image.open(io.BytesIO(base64.b64decode(first.split(",", 1)[1])))
    assert im.size == (96, 48) and im.getpixel((48, 24))[0] > 240
    Image.new("RGB", (300, 150), (0, 0, 255)).save(path)  # same size, new content
    os.utime(path, ns=(10**18, 10**18))
    second = thumbnail_uri(path, 96)
    im = Image.open(io.BytesIO(base64.b64decode(second.split(",", 1)[1])))
    assert im.getpixel((48, 24))[2] > 240  # not the cached red one
    assert thumbnail_uri(tmp_path / "missing.png", 96) is None
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert thumbnail_uri(tmp_path / "bad.png", 96) is None


def test_missing_chromium_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="must run in CI"):
        chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        chromium()


# ---------------------------------------------------------------------- the command line

def test_report_verb_and_adapt_html_write_the_same_page(adapt_run, tmp_path):
    """`grata report RUN` writes RUN/report.html from report.json: the page holds every
    method x target of report.json (the browser tests check the numbers themselves)."""
    page = adapt_run / "report.html"
    page.unlink(missing_ok=True)
    assert main(["report", str(adapt_run), "--no-plots"]) == 0
    dom = Dom(page.read_text())
    report = json.loads((adapt_run / "report.json").read_text())
    text = page.read_text()
    for r in report["results"]:
        assert r["method"] in text and r["target"] in text
    assert dom.images, "overlay thumbnails expected"
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_serve_html_flag_rewrites_the_page_after_each_image(bench, edge64, tmp_path):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    photos = sorted((bench / "data" / TARGETS[0]).rglob("image/*.png"))[:2]
    for k, p in enumerate(photos):
        shutil.copy(p, inbox / f"eye{k}.png")
    rc = main(["serve", "--inbox", str(inbox), "--outbox", str(outbox), "--artifacts",
               str(edge64[1]), "--predictor", "onnxruntime", "--device", "cpu", "--once",
               "--settle", "0.1", "--poll", "0.02", "--quiet", "--html",
               "--vcdr-threshold", "0.05"])
    assert rc == 0
    text = (outbox / "report.html").read_text()
    for k in range(len(photos)):
        assert f"eye{k}.png" in text
    assert "2 photograph(s)" in text
    with pytest.raises(SystemExit) as exit_:  # a typo is refused before any work
        main(["serve", "--inbox", str(inbox), "--outbox", str(outbox), "--artifacts",
              str(edge64[1]), "--html", "--vcdr-threshold", "six"])
    assert exit_.value.code == 2

"""grata.report on hand-made results: the means over targets, the printed table's columns,
the complete flag, and strict JSON."""

import json
import math

import pytest

from grata.adapt import Result
from grata.report import build_report, format_table, write_json_atomic


def _row(i, od, oc, vcdr_error):
    return {"index": i, "file": f"im{i}.png", "dice_od": od, "dice_oc": oc,
            "dice_mean": (od + oc) / 2, "asd_od": 1.0 + i, "asd_oc": 2.0 * i,
            "vcdr_pred": 0.5, "vcdr_gt": 0.4, "vcdr_error": vcdr_error, "time_s": 0.01}


# OD and OC far apart and every field different, so a swapped or wrong field shows
HAND = {
    ("bn", "A"): [_row(1, 90.0, 60.0, 0.1), _row(2, 80.0, 40.0, 0.3)],
    ("bn", "B"): [_row(1, 70.0, 30.0, math.nan)],
    ("grata", "A"): [_row(1, 95.0, 65.0, 0.2)],
    ("grata", "B"): [_row(1, 75.0, 35.0, 0.05), _row(2, 85.0, 25.0, 0.15)],
}


def results():
    out = []
    for (m, t), rows in HAND.items():
        r = Result(m, t)
        r.images = rows
        out.append(r)
    return out


def test_per_target_and_mean_over_targets_by_hand():
    report = build_report(results(), {"x": 1})
    cell = {(r["method"], r["target"]): r for r in report["results"]}
    assert cell[("bn", "A")]["dice_od"] == 85.0 and cell[("bn", "A")]["dice_oc"] == 50.0
    assert cell[("bn", "A")]["dice_mean"] == 67.5 and cell[("bn", "A")]["vcdr_mae"] == \
        pytest.approx(0.2)
    assert math.isnan(cell[("bn", "B")]["vcdr_mae"])
    assert cell[("grata", "B")]["dice_od"] == 80.0 and cell[("grata", "B")]["dice_oc"] == 30.0
    # means over the two targets, by hand
    bn = report["mean_over_targets"]["bn"]
    assert (bn["dice_od"], bn["dice_oc"], bn["dice_mean"]) == pytest.approx(
        ((85 + 70) / 2, (50 + 30) / 2, (67.5 + 50) / 2))
    assert report["mean_over_targets"]["grata"] == pytest.approx(
        {"dice_od": (95 + 80) / 2, "dice_oc": (65 + 30) / 2, "dice_mean": (80 + 55) / 2,
         "vcdr_mae": (0.2 + 0.1) / 2})
    assert report["complete"] is True and report["config"] == {"x": 1}
    assert build_report(results(), {}, complete=False)["complete"] is False


def test_table_columns_are_od_oc_mean_per_target_then_the_average():
    text = format_table(build_report(results(), {}))
    lines = text.splitlines()
    assert lines[0].split("|")[1].strip() == "A" and lines[0].split("|")[2].strip() == "B"
    assert lines[0].split("|")[3].strip() == "mean over targets"
    assert lines[1].split("|")[1].split() == ["OD", "OC", "mean"]
    rows = {ln.split("|")[0].strip(): [c.split() for c in ln.split("|")[1:]] for ln in lines[3:]}
    assert rows["bn"] == [["85.00", "50.00", "67.50"], ["70.00", "30.00", "50.00"],
                          ["77.50", "40.00", "58.75"]]
    assert rows["grata"] == [["95.00", "65.00", "80.00"], ["80.00", "30.00", "55.00"],
                             ["87.50", "47.50", "67.50"]]


def test_a_method_without_images_shows_dashes_and_json_is_strict(tmp_path):
    res = results() + [Result("tent", "A")]
    report = build_report(res, {})
    line = next(ln for ln in format_table(report).splitlines() if ln.startswith("tent"))
    assert line.split("|")[1].split() == ["-", "-", "-"]
    write_json_atomic(tmp_path / "r.json", report)
    text = (tmp_path / "r.json").read_text()
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert back["mean_over_targets"]["tent"]["dice_od"] is None
    assert back["results"][1]["vcdr_mae"] is None  # bn on B: no target disc

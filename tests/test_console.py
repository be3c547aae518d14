"""The installed `grata` console script, run as a user runs it: help, synth, train-source,
export and adapt; report.json's schema and numbers against the per-image rows, the printed
table against report.json, and Ctrl-C keeping the finished domains."""

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grata import synth

VERBS = ("synth", "train-source", "export", "adapt", "serve", "bench", "calibrate")
TARGETS = synth.TARGET_DOMAINS[:2]


def console_script() -> str:
    """The `grata` entry point installed beside this interpreter (the venv's bin first)."""
    for folder in (str(Path(sys.executable).parent), sysconfig.get_path("scripts")):
        candidate = Path(folder) / "grata"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("grata")
    if found is None:
        pytest.fail("the grata console script is not installed (pip install -e .)")
    return found


def grata(*args, timeout=600, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([console_script(), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_help_of_the_command_and_every_verb():
    top = grata("--help").stdout
    assert top.startswith("usage: grata")
    for verb in VERBS:
        assert re.search(rf"^\s+{re.escape(verb)}\s", top, re.M), verb
        out = grata(verb, "--help").stdout
        assert out.startswith(f"usage: grata {verb}") and "--help" in out, verb
    assert grata(check=False).returncode == 2  # no command: help and a usage error


def test_synth_writes_the_documented_benchmark(tmp_path):
    out = tmp_path / "synth"
    proc = grata("synth", "--out", out, "--seed", "0")
    assert str(out) in proc.stdout
    summary = json.loads((out / "synth.json").read_text())
    assert summary["seed"] == 0 and summary["source"] == synth.SOURCE_DOMAIN
    assert summary["targets"] == list(synth.TARGET_DOMAINS)
    for domain, counts in summary["domains"].items():
        for split in ("train", "test"):
            rows = (out / f"{domain}_{split}.csv").read_text().splitlines()
            assert rows[0] == "image,mask" and len(rows) - 1 == counts[split]
            for row in rows[1:]:
                assert all((out / p).is_file() for p in row.split(","))
    # the files are the generator's output for that seed (PNG is lossless)
    first = (out / f"{synth.SOURCE_DOMAIN}_train.csv").read_text().splitlines()[1].split(",")
    image, mask = synth.render(synth._rng(0, synth.SOURCE_DOMAIN, "train", 0),
                               synth.SOURCE_DOMAIN, summary["size"])
    assert np.array_equal(np.asarray(Image.open(out / first[0]).convert("RGB")), image)
    assert np.array_equal(np.asarray(Image.open(out / first[1]).convert("L")), mask)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """train-source (1 epoch at 64 on 4 images) -> export -> adapt (onnx), all through
    the console script."""
    root = tmp_path_factory.mktemp("console")
    data = root / "data"
    synth.generate(data, seed=3, n_source=(4, 1), n_target=(2, 1), size=96, progress=False)
    ckpt = root / "edge.pt"
    train = grata("train-source", "--data", data, "--domain", synth.SOURCE_DOMAIN,
                  "--arch", "edge", "--size", "64", "--epochs", "1", "--batch", "2",
                  "--threads", "1", "--out", ckpt)
    art = root / "art"
    export = grata("export", "--checkpoint", ckpt, "--arch", "edge", "--size", "64",
                   "--out", art)
    run = root / "run"
    adapt = grata("adapt", "--data", data, "--source", synth.SOURCE_DOMAIN,
                  "--targets", ",".join(TARGETS), "--artifacts", art, "--size", "64",
                  "--checkpoint", ckpt, "--arch", "edge",
                  "--methods", "source,bn,tent,grata", "--threads", "1", "--quiet",
                  "--paper", "--out", run)  # per-image statistics: the rows differ
    return {"data": data, "ckpt": ckpt, "art": art, "run": run, "train": train,
            "export": export, "adapt": adapt}


def test_train_source_writes_a_loadable_checkpoint_with_its_digest(pipeline):
    from grata.models import load_checkpoint
    ckpt = pipeline["ckpt"]
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert f"sha256 {digest}" in pipeline["train"].stdout
    assert "4 images" in pipeline["train"].stdout
    import torch
    model = load_checkpoint(ckpt, "edge")
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(1, 3, 64, 64))).all()


def test_export_writes_a_manifest_whose_digests_hold(pipeline):
    from grata.export import load_manifest
    manifest = load_manifest(pipeline["art"])
    assert manifest["n_theta"] == 2944  # the edge model's BN affine parameters
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((pipeline["art"] / name).read_bytes()).hexdigest() == digest
    assert "theta 2944 values" in pipeline["export"].stdout


RESULT_KEYS = {"method", "target", "n_images", "dice_od", "dice_oc", "dice_mean", "vcdr_mae",
               "asd_od", "asd_oc", "time_per_image_s", "skipped", "events", "images"}
IMAGE_KEYS = {"index", "file", "dice_od", "dice_oc", "dice_mean", "asd_od", "asd_oc",
              "vcdr_pred", "vcdr_gt", "vcdr_error", "time_s"}
CONFIG_KEYS = {"engine", "device", "data", "source", "targets", "checkpoint", "arch", "size",
               "methods", "protocol", "seed", "grata_version"}
MEAN_KEYS = ("dice_od", "dice_oc", "dice_mean", "vcdr_mae")


def _mean(values):
    values = [v for v in values if v is not None]
    return math.fsum(values) / len(values) if values else None


def test_report_has_the_full_schema_and_its_means_follow_the_rows(pipeline):
    report = json.loads((pipeline["run"] / "report.json").read_text())
    assert report["format_version"] == 1 and report["complete"] is True
    assert report["elapsed_s"] > 0
    assert CONFIG_KEYS <= set(report["config"])
    assert report["config"]["targets"] == list(TARGETS)
    assert report["config"]["engine"] == "onnx" and report["config"]["protocol"] == "domain"
    methods = ["source", "bn", "tent", "grata"]
    assert [(r["method"], r["target"]) for r in report["results"]] == \
        [(m, t) for t in TARGETS for m in methods]
    for r in report["results"]:
        assert RESULT_KEYS <= set(r), RESULT_KEYS - set(r)
        assert r["n_images"] == len(r["images"]) == 3 and r["skipped"] == [] and r["events"] == []
        for i, row in enumerate(r["images"], start=1):
            assert IMAGE_KEYS <= set(row) and row["index"] == i
            assert row["dice_mean"] == pytest.approx((row["dice_od"] + row["dice_oc"]) / 2)
            for key in ("dice_od", "dice_oc"):
                assert 0 <= row[key] <= 100
        extra = {"grata": {"loss_ent", "loss_con", "cos"}, "tent": {"loss_ent"}}
        assert all(extra.get(r["method"], set()) <= set(row) for row in r["images"])
        for key in ("dice_od", "dice_oc", "asd_od", "asd_oc"):
            assert r[key] == pytest.approx(_mean([row[key] for row in r["images"]]), rel=1e-12)
        assert r["dice_mean"] == pytest.approx((r["dice_od"] + r["dice_oc"]) / 2, rel=1e-12)
        assert r["vcdr_mae"] == pytest.approx(_mean([row["vcdr_error"] for row in r["images"]]),
                                              rel=1e-12)
    assert set(report["mean_over_targets"]) == set(methods)
    for m in methods:
        mine = [r for r in report["results"] if r["method"] == m]
        for key in MEAN_KEYS:
            assert report["mean_over_targets"][m][key] == pytest.approx(
                _mean([r[key] for r in mine]), rel=1e-12), (m, key)
    # the four methods are not one number: source uses stored statistics, the rest not
    od = {m: report["mean_over_targets"][m]["dice_od"] for m in methods}
    assert len({round(v, 6) for v in od.values()}) > 1, od


def parse_table(stdout: str) -> dict:
    """{method: [(od, oc, mean) per target..., mean over targets]} from the printed table."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method"))
    table = {}
    for line in lines[start + 2:]:
        if "|" not in line:
            break
        name, *cells = line.split("|")
        table[name.strip()] = [tuple(float(v) if v != "-" else None for v in c.split())
                               for c in cells]
    return table


def test_printed_table_matches_the_report(pipeline):
    report = json.loads((pipeline["run"] / "report.json").read_text())
    table = parse_table(pipeline["adapt"].stdout)
    header = next(line for line in pipeline["adapt"].stdout.splitlines() if "mean over targets"
                  in line)
    assert [c.strip() for c in header.split("|")[1:-1]] == [t[:20] for t in TARGETS]
    assert set(table) == {"source", "bn", "tent", "grata"}
    cell = {(r["method"], r["target"]): r for r in report["results"]}
    for m, cells in table.items():
        assert len(cells) == len(TARGETS) + 1
        for t, (od, oc, mean) in zip(TARGETS, cells):
            r = cell[(m, t)]
            assert (od, oc, mean) == pytest.approx(
                (r["dice_od"], r["dice_oc"], r["dice_mean"]), abs=0.0051), (m, t)
        o = report["mean_over_targets"][m]
        assert cells[-1] == pytest.approx((o["dice_od"], o["dice_oc"], o["dice_mean"]),
                                          abs=0.0051), m


def test_ctrl_c_exits_130_and_keeps_the_finished_domains(pipeline, tmp_path):
    """SIGINT while the second domain streams: exit code 130, report.json is the partial
    report (complete false) with the first domain's results."""
    data = tmp_path / "data"
    shutil.copytree(pipeline["data"], data)
    first = TARGETS[0]
    rows = (data / f"{first}_train.csv").read_text().splitlines()
    (data / "Long_train.csv").write_text("\n".join([rows[0]] + rows[1:] * 400) + "\n")
    out = tmp_path / "run"
    cmd = [console_script(), "adapt", "--data", str(data), "--targets", f"{first},Long",
           "--checkpoint", str(pipeline["ckpt"]), "--arch", "edge", "--size", "64",
           "--backend", "torch", "--methods", "bn,grata", "--threads", "1", "--quiet",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 300
        while not (out / "report.json").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no partial report after 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is False
    assert [(r["method"], r["target"]) for r in report["results"]] == \
        [("bn", first), ("grata", first)]
    assert all(r["n_images"] == 3 for r in report["results"])
    assert set(report["mean_over_targets"]) == {"bn", "grata"}

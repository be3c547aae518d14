"""The shipped model on synthetic streams: adaptation pays off on the camera shifts,
per-image statistics fail where the crop's content changes, and the default runs."""

import hashlib
import json

import numpy as np
import pytest

import torch

from grata import defaults, metrics
from grata.adapt import run
from grata.cli import main
from grata.domains import Sample, stream_domain
from grata.models import load_checkpoint, set_norm_mode
from grata.synth import CAMERA_DOMAINS, SOURCE_DOMAIN, TARGET_DOMAINS, generate
from grata.torch_engine import TorchEngine

# Seeded stream: generator seed 7 (not the embedded default's 0), 12 images per target,
# strong-view seed 0. Measured on the shipped checkpoint over the camera targets (their
# images are those of synth v3): source 79.70, bn 83.71, grata 83.70 mean Dice (+4.0 for
# grata over source). Over all nine v4 targets the paper's setting loses instead: source
# 75.72, bn 74.53, grata 74.53 (the content targets WideCrop and TightCrop, below).
MARGIN = 3.0  # Dice points by which GraTa's mean over camera targets must beat source-only
# Forward only on the same stream, Norm2d "sample" minus "running": WideCrop -23.5,
# TightCrop -15.6 Dice points; +4.0 on average over the camera targets.
HARM = 10.0  # points per-image statistics must lose on the crops at another scale


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e") / "data"
    generate(root, seed=7, n_source=(1, 1), n_target=(8, 4), progress=False)
    return root


def test_shipped_checkpoint_is_the_documented_one():
    path = defaults.checkpoint()
    assert path.is_file() and path.stat().st_size < 16 * 2**20
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    readme = (defaults.checkpoint().parents[2] / "README.md")
    if readme.exists():  # an installed wheel has no README beside it
        assert digest in readme.read_text()


def test_grata_beats_source_only_on_a_seeded_synthetic_stream(stream):
    ckpt = defaults.checkpoint()

    def factory():
        return TorchEngine(load_checkpoint(ckpt, defaults.DEFAULT_ARCH))

    results = run(factory, stream, list(CAMERA_DOMAINS), defaults.DEFAULT_SIZE,
                  ["source", "bn", "grata"], seed=0, progress=False)
    mean = {m: np.mean([r.summary()["dice_mean"] for r in results if r.method == m])
            for m in ("source", "bn", "grata")}
    assert mean["grata"] >= mean["source"] + MARGIN, mean
    assert mean["grata"] >= mean["bn"] - 0.5, mean  # the update does not undo BN's gain


def _dice_by_statistics(model, root, domain, mode):
    set_norm_mode(model, mode)
    samples = [s for s in stream_domain(root, domain, defaults.DEFAULT_SIZE)
               if isinstance(s, Sample)]
    with torch.no_grad():
        logits = model(torch.from_numpy(np.stack([s.image for s in samples]))).numpy()
    probs = metrics.probs_from_logits(logits)
    return np.mean([(metrics.dice(p[0], s.target[0]) + metrics.dice(p[1], s.target[1])) / 2
                    for p, s in zip(probs, samples)])


def test_per_image_statistics_harm_where_the_crop_changes_scale(stream):
    """The benchmark shows the real cameras' failure: BN at batch 1 (the paper's
    statistics) loses against the stored statistics when the disc fills more or less of
    the crop, while it gains on the camera shifts."""
    model = load_checkpoint(defaults.checkpoint(), defaults.DEFAULT_ARCH)
    for domain in ("WideCrop", "TightCrop"):
        harm = (_dice_by_statistics(model, stream, domain, "sample")
                - _dice_by_statistics(model, stream, domain, "running"))
        assert harm < -HARM, (domain, harm)
    gain = np.mean([_dice_by_statistics(model, stream, d, "sample")
                    - _dice_by_statistics(model, stream, d, "running") for d in CAMERA_DOMAINS])
    assert gain > 2.0, gain


@pytest.mark.slow
def test_embedded_default_runs_with_no_arguments_but_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRATA_CACHE", str(tmp_path / "cache"))
    assert main(["adapt", "--quiet", "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["engine"] == "onnx" and report["complete"]
    assert {r["target"] for r in report["results"]} == set(TARGET_DOMAINS)
    assert SOURCE_DOMAIN not in {r["target"] for r in report["results"]}
    out = capsys.readouterr().out
    assert "mean over targets" in out
    # issue "do no harm": the default run is within 1 Dice point of the source model on
    # every target domain and beats it on average (grata.product's measured defaults)
    dice = {(r["method"], r["target"]): r["dice_mean"] for r in report["results"]}
    for method in {m for m, _ in dice} - {"source"}:
        for target in TARGET_DOMAINS:
            assert dice[method, target] >= dice["source", target] - 1.0, (method, target)
        assert np.mean([dice[method, t] for t in TARGET_DOMAINS]) > np.mean(
            [dice["source", t] for t in TARGET_DOMAINS]), method

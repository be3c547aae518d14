"""Whole photographs at the model's disc scale (`grata.photo_scale.PhotoScaleLocator`):
the final box measured against the truth mask, the model's second opinion on a photograph
the localiser doubts, a refusal naming both reasons, and `grata adapt` / `grata serve`
with ``--roi auto --scale auto`` against a recomputation from the recorded box."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from grata import defaults, metrics, roi, synth_whole
from grata.cli import main
from grata.decode import load_photo_pair
from grata.domains import RoiOptions
from grata.metrics import vertical_diameter
from grata.models import load_checkpoint, set_norm_mode
from grata.photo_scale import PhotoScaleLocator
from grata.placement import Placement
from grata.scale_search import AS_GIVEN_TOLERANCE, StreamScale, recrop
from grata.synth import SOURCE_DOMAIN

SIZE = defaults.DEFAULT_SIZE
SCALE = defaults.disc_scale()
# The model's spread (10-90 % of its training discs), widened as the crops' stage widens it
BAND = (SCALE.low * math.exp(-AS_GIVEN_TOLERANCE), SCALE.high * math.exp(AS_GIVEN_TOLERANCE))


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """Eight whole photographs (512 x 400), one per split of each target domain."""
    root = tmp_path_factory.mktemp("whole") / "data"
    synth_whole.generate_whole(root, seed=5, n_source=(0, 1), n_target=(1, 1), size=512,
                               progress=False)
    return root


@pytest.fixture(scope="module")
def model():
    m = load_checkpoint(defaults.checkpoint(), defaults.DEFAULT_ARCH).eval()
    set_norm_mode(m, "running")  # the source model: stored statistics
    return m


def logits_of(model):
    def predict(x):
        with torch.no_grad():
            return model(torch.from_numpy(x[None])).numpy()
    return predict


def photographs(root, domains=synth_whole.TARGET_DOMAINS):
    truth = json.loads((root / "synth.json").read_text())["discs"]
    for name in sorted(truth):
        if name.split("/")[0] in domains:
            mask = root / name.replace("/image/", "/mask/").rsplit(".", 1)[0]
            pixels, target = load_photo_pair(root / name, f"{mask}.png")
            yield name, pixels, target


def disc_in_box(target, box) -> float:
    """The true disc's vertical diameter in the box over the box's side."""
    return vertical_diameter(roi.crop(target[0].astype(np.uint8), box) > 0) / (box[3] - box[1])


def test_the_box_gives_the_true_disc_the_models_diameter(whole, model):
    loc = PhotoScaleLocator(SIZE, SCALE, logits_of(model))
    seen = []
    for name, pixels, target in photographs(whole):
        x, pl = loc.locate(pixels, name)
        rec = pl.record
        assert pl.key == "roi" and pl.shape == pixels.shape[:2]
        assert rec["box"] == list(pl.box) and rec["second_opinion"] is False
        assert rec["score"] >= roi.SCORE_THRESHOLD and rec["scale"]["how"] != "fallback-roi"
        seen.append(disc_in_box(target, pl.box))
        assert BAND[0] <= seen[-1] <= BAND[1], (name, seen[-1])
        # the input is cut from the photograph itself, not from the candidate window
        assert np.array_equal(x, recrop(pixels, pl.box, SIZE))
        assert rec["scale"]["factor"] == pytest.approx(
            round(roi.ROI_FRACTION * rec["fov"]["d"]) / (pl.box[3] - pl.box[1]), abs=1e-3)
    assert abs(math.log(np.median(seen) / SCALE.diameter)) < 0.15
    # the stream's estimate is in FOV diameters: the photographs' disc over their FOV
    truth = json.loads((whole / "synth.json").read_text())["discs"]
    rel = [2 * t["ry"] / t["fov"]["d"] for n, t in truth.items() if n.split("/")[0] !=
           SOURCE_DOMAIN]
    assert loc.stream.settled
    assert loc.stream.estimate() == pytest.approx(np.median(rel), rel=0.2)
    loc.reset()
    assert loc.stream.estimate() is None


def test_a_doubted_photograph_with_a_disc_is_kept_on_the_models_second_opinion(
        whole, model, monkeypatch):
    name, pixels, target = next(photographs(whole, ("LowLight",)))
    real = roi.locate_disc

    def doubting(image):
        info = real(image)
        return dict(info, score=0.2, reason="no vessels converge on the brightest region")

    monkeypatch.setattr(roi, "locate_disc", doubting)
    with pytest.raises(roi.RoiRejected):  # --scale none refuses it ...
        roi.prepare(pixels)
    x, pl = PhotoScaleLocator(SIZE, SCALE, logits_of(model)).locate(pixels, name)
    rec = pl.record  # ... the model's second opinion keeps it
    assert rec["second_opinion"] is True and rec["score"] == 0.2
    assert rec["scale"]["confidence"] >= 0.3 and rec["scale"]["how"] == "per-image"
    assert BAND[0] <= disc_in_box(target, pl.box) <= BAND[1]
    full = pl.paste(metrics.probs_from_logits(logits_of(model)(x))[0])
    assert metrics.dice(full[0], target[0]) > 70  # it lands on the true disc


@pytest.mark.parametrize("kind", ["black", "noise"])
def test_a_photograph_without_a_disc_is_refused_naming_both_reasons(model, kind):
    rng = np.random.default_rng(0)
    pixels = np.zeros((400, 512, 3), np.uint8) if kind == "black" else \
        rng.integers(0, 256, (400, 512, 3), dtype=np.uint8)
    calls = []

    def predict(x):
        calls.append(1)
        return logits_of(model)(x)

    with pytest.raises(roi.RoiRejected) as e:
        PhotoScaleLocator(SIZE, SCALE, predict).locate(pixels, kind)
    line = e.value.reason
    assert "\n" not in line and line.startswith("optic disc not found: localiser score 0.00 < 0.50 (")
    assert "second opinion" in line
    assert ("flat image" in line) if kind == "black" else ("no plausible disc" in line)
    assert (not calls) if kind == "black" else calls  # the model was asked where it can see


def test_a_sure_localiser_keeps_the_benchmarks_roi_where_the_model_sees_nothing(whole):
    name, pixels, _ = next(photographs(whole, ("Legacy",)))
    blind = PhotoScaleLocator(SIZE, SCALE, lambda x: np.full((1, 2, SIZE, SIZE), -9.0,
                                                             np.float32))
    x, pl = blind.locate(pixels, name)
    info = roi.locate_disc(pixels)
    assert pl.box == roi.roi_box(pixels.shape, info, info["fov"])  # today's rule
    assert pl.record["scale"]["how"] == "fallback-roi" and pl.record["scale"]["reason"]
    assert pl.record["second_opinion"] is False
    assert np.array_equal(x, recrop(pixels, pl.box, SIZE))


def test_a_known_disc_is_boxed_at_the_models_scale(whole):
    truth = json.loads((whole / "synth.json").read_text())["discs"]
    name, pixels, target = next(photographs(whole, ("Handheld",)))
    t = truth[name]
    loc = PhotoScaleLocator(SIZE, SCALE, None, RoiOptions(discs=truth))
    _, pl = loc.locate(pixels, name)
    side = round(2 * t["ry"] / SCALE.diameter)
    assert pl.box[2] - pl.box[0] == pl.box[3] - pl.box[1] == side
    assert ((pl.box[0] + pl.box[2]) / 2, (pl.box[1] + pl.box[3]) / 2) == pytest.approx(
        (t["cx"], t["cy"]), abs=1)
    assert disc_in_box(target, pl.box) == pytest.approx(SCALE.diameter, abs=0.03)


def test_stream_rescaled_is_the_same_stream_in_another_unit():
    s = StreamScale()
    for v in (0.1, 0.12, 0.11):
        s.update(v)
    r = s.rescaled(2.5)
    assert r.settled and list(r.accepted) == pytest.approx([0.25, 0.3, 0.275])
    assert r.estimate() == pytest.approx(2.5 * s.estimate())
    r.update(0.3)
    assert len(s.accepted) == 3  # a copy: the stream itself is untouched


# ----------------------------------------------------------------------------- the verbs

def test_adapt_roi_auto_scale_auto_scores_the_recorded_box(whole, model, tmp_path):
    data = tmp_path / "data"
    import shutil
    shutil.copytree(whole, data)
    Image.fromarray(np.zeros((400, 512, 3), np.uint8)).save(data / "black.png")
    Image.fromarray(np.full((400, 512), 255, np.uint8)).save(data / "black_mask.png")
    csv = data / "LowLight_test.csv"
    csv.write_text(csv.read_text() + "black.png,black_mask.png\n")
    assert main(["adapt", "--data", str(data), "--source", SOURCE_DOMAIN, "--targets",
                 "LowLight,Legacy", "--engine", "torch", "--methods", "source,bn", "--quiet",
                 "--roi", "auto", "--scale", "auto", "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["roi"] == "auto" and report["config"]["scale"] == "auto"
    source = [r for r in report["results"] if r["method"] == "source"]
    assert [r["n_images"] for r in source] == [2, 2]
    skipped = source[0]["skipped"]
    assert [s["file"] for s in skipped] == ["black.png"]
    assert "localiser score" in skipped[0]["reason"] and "second opinion" in skipped[0]["reason"]
    bn = {r["file"]: r for res in report["results"] if res["method"] == "bn"
          for r in res["images"]}
    for result in source:
        for row in result["images"]:
            rec = row["roi"]
            assert set(rec) >= {"box", "score", "cx", "cy", "r", "fov", "second_opinion",
                                "scale"}
            assert set(rec["scale"]) >= {"how", "factor", "confidence", "n_forward"}
            assert bn[row["file"]]["roi"]["box"] == rec["box"]  # located once for both
            mask = data / row["file"].replace("/image/", "/mask/").rsplit(".", 1)[0]
            pixels, truth = load_photo_pair(data / row["file"], f"{mask}.png")
            x = recrop(pixels, tuple(rec["box"]), SIZE)  # the recorded box, by hand
            with torch.no_grad():
                p = torch.sigmoid(model(torch.from_numpy(x[None])))[0].numpy()
            full = Placement(pixels.shape[:2], tuple(rec["box"])).paste(p)
            assert row["dice_od"] == pytest.approx(metrics.dice(full[0], truth[0]), abs=1e-3)
            assert row["dice_oc"] == pytest.approx(metrics.dice(full[1], truth[1]), abs=1e-3)
            assert row["dice_od"] > 60


def test_serve_roi_auto_scale_auto_records_the_box(whole, tmp_path):
    from grata.artifacts import default_artifacts
    from grata.masks import to_mask_png
    from grata.metrics import binarize, probs_from_logits
    from grata.runtime import OrtEngine
    art = default_artifacts()[0]  # the shipped model: its disc scale in the manifest
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    photos = {}
    for k, (name, pixels, _) in enumerate(photographs(whole, ("Widefield", "Legacy"))):
        photos[f"eye{k}.png"] = pixels
        Image.fromarray(pixels).save(inbox / f"eye{k}.png")
    Image.new("RGB", (400, 300)).save(inbox / "black.png")
    rc = main(["serve", "--inbox", str(inbox), "--outbox", str(outbox), "--artifacts",
               str(art), "--method", "source", "--predictor", "onnxruntime", "--device",
               "cpu", "--once", "--settle", "0.1", "--poll", "0.02", "--stable-for", "0",
               "--quiet", "--roi", "auto", "--scale", "auto"])
    assert rc == 0
    engine = OrtEngine(art)  # the source model, independently

    def logits(x):
        return engine.infer(engine.to_input(x), norm="source")

    records = [json.loads(r.read_text()) for r in outbox.glob("*.json")]
    assert sorted(r["image"] for r in records) == sorted(photos)
    for record in records:
        pixels, rec = photos[record["image"]], record["roi"]
        assert rec["scale"]["how"] in ("per-image", "stream") and rec["score"] >= 0.5
        box = tuple(rec["box"])
        pred = binarize(probs_from_logits(logits(recrop(pixels, box, engine.size))[0]))
        mask = np.asarray(Image.open(outbox / record["files"]["mask"]))
        assert mask.shape == pixels.shape[:2]  # the photograph's own size
        np.testing.assert_array_equal(mask, to_mask_png(Placement(mask.shape, box).paste(pred)))
    state = json.loads((outbox / ".state" / "config.json").read_text())
    assert state["roi"] == "auto" and state["scale"] == "auto"
    reason = (inbox / "rejected" / "black.png.reason.txt").read_text()
    line = next(ln for ln in reason.splitlines() if ln.startswith("reason:"))
    assert "localiser score" in line and "second opinion" in line, line

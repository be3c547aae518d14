"""Whole photographs through `grata adapt --roi auto`: the crop's prediction is pasted
back and scored at the photograph's size (checked against a hand-made paste-back);
`--roi none` is today's run; a photograph without a disc is a skipped row; overlays show
the whole photograph with its box; `grata synth --whole`; the benchmark's comparison."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grata import adapt, defaults, metrics, roi, synth_whole
from grata.cli import main
from grata.decode import load_pair
from grata.domains import RoiOptions, stream_domain
from grata.engine_chooser import engine_factory
from grata.models import load_checkpoint
from grata.photo import segment_photograph
from grata.report import BOX_COLOUR, photo_overlay
from grata.synth import SOURCE_DOMAIN, generate

SIZE = defaults.DEFAULT_SIZE
TARGET = "LowLight"
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "roi_end_to_end.py"


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """Two whole photographs (512 x 400) of one target domain, with synth.json."""
    root = tmp_path_factory.mktemp("whole") / "data"
    synth_whole.generate_whole(root, seed=2, n_source=(0, 1), n_target=(1, 1), size=512,
                               progress=False)
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_checkpoint(defaults.checkpoint(), defaults.DEFAULT_ARCH).eval()


def _source_pred(model, x):
    """The shipped model's source prediction [2, S, S] (bool) of an input [3, S, S]."""
    with torch.no_grad():
        logits = model(torch.from_numpy(x)[None]).numpy()[0]
    return metrics.binarize(metrics.probs_from_logits(logits))


def _by_hand(model, image_path, mask_path, box):
    """Independent pipeline: crop at `box` with numpy, bilinear resize and min-max, the
    model, nearest resize of each channel to the box, paste with numpy slicing, Dice on
    the full-size masks."""
    photo = np.asarray(Image.open(image_path).convert("RGB"))
    H, W = photo.shape[:2]
    x0, y0, x1, y1 = box
    padded = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, H), min(x1, W)
    padded[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = photo[sy0:sy1, sx0:sx1]
    x = np.asarray(Image.fromarray(padded).resize((SIZE, SIZE), Image.BILINEAR), np.float32)
    x = ((x - x.min()) / (x.max() - x.min())).transpose(2, 0, 1).copy()
    pred = _source_pred(model, x)
    full = np.zeros((2, H, W), bool)
    for c in range(2):
        big = np.asarray(Image.fromarray(pred[c].astype(np.uint8) * 255).resize(
            (x1 - x0, y1 - y0), Image.NEAREST)) > 0
        full[c, sy0:sy1, sx0:sx1] = big[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
    mask = np.asarray(Image.open(mask_path).convert("L"))
    gt = np.stack([mask < 255, mask == 0])
    return {"dice_od": metrics.dice(full[0], gt[0]), "dice_oc": metrics.dice(full[1], gt[1])}, \
        full


def _rows(report, method):
    return next(r for r in report["results"] if r["method"] == method)["images"]


def _adapt(root, out, *extra, targets=TARGET):
    return main(["adapt", "--data", str(root), "--source", SOURCE_DOMAIN, "--targets", targets,
                 "--engine", "torch", "--quiet", "--out", str(out), *extra])


def test_roi_auto_scores_the_pasted_back_whole_photograph(whole, model, tmp_path):
    # the localiser's ROI rule (--scale none); the default places the box at the model's
    # disc scale (tests/test_photo_scale.py)
    assert _adapt(whole, tmp_path / "run", "--roi", "auto", "--scale", "none", "--methods",
                  "source,grata", "--overlays") == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["roi"] == "auto" and report["config"]["scale"] == "none"
    rows = _rows(report, "source")
    assert len(rows) == 2
    for row in rows:
        image_path = whole / row["file"]
        mask_path = whole / row["file"].replace("/image/", "/mask/").replace(".jpg", ".png")
        photo = np.asarray(Image.open(image_path).convert("RGB"))
        _, box, info = roi.prepare(photo)
        assert row["roi"]["box"] == list(box) and row["roi"]["score"] == round(info["score"], 4)
        expect, full = _by_hand(model, image_path, mask_path, box)
        assert row["dice_od"] == pytest.approx(expect["dice_od"], abs=1e-9)
        assert row["dice_oc"] == pytest.approx(expect["dice_oc"], abs=1e-9)
        # the photograph's own size: pixels outside the box are background and count
        assert full.shape[1:] == photo.shape[:2] and 0 < expect["dice_od"] < 100
    # every method is scored at full size and records its box
    assert all("box" in r["roi"] for r in _rows(report, "grata"))
    # overlays: the whole photograph (its aspect), the box drawn in its colour
    png = min((tmp_path / "run" / "overlays" / "source").rglob("*.png"))
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == photo.shape[:2]  # 512 wide: not downscaled
    box = rows[0]["roi"]["box"]
    assert (img[box[1], max(box[0], 0) + 5:min(box[2], 511) - 5] == BOX_COLOUR).all()


def test_a_photograph_without_a_disc_is_a_skipped_row(whole, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(whole, data)
    csv = data / f"{TARGET}_test.csv"
    Image.fromarray(np.zeros((400, 512, 3), np.uint8)).save(data / "black.png")
    Image.fromarray(np.full((400, 512), 255, np.uint8)).save(data / "black_mask.png")
    csv.write_text(csv.read_text() + "black.png,black_mask.png\n")
    assert _adapt(data, tmp_path / "run", "--roi", "auto", "--methods", "source") == 0
    result = json.loads((tmp_path / "run" / "report.json").read_text())["results"][0]
    assert result["n_images"] == 2
    assert [s["file"] for s in result["skipped"]] == ["black.png"]
    assert result["skipped"][0]["reason"].startswith("optic disc not found: ")
    # the library says the same, with the reason
    with pytest.raises(roi.RoiRejected) as e:
        segment_photograph(np.zeros((400, 512, 3), np.uint8), lambda x: x[:2], SIZE)
    assert e.value.reason


def test_roi_none_is_todays_run(tmp_path, model):
    root = tmp_path / "crops"
    generate(root, seed=3, n_source=(1, 0), n_target=(2, 0), size=SIZE, progress=False)
    target = "Handheld"
    # crops as given (--scale none: the disc-scale stage has its own tests)
    assert _adapt(root, tmp_path / "a", "--methods", "source,bn", "--scale", "none",
                  targets=target) == 0
    assert _adapt(root, tmp_path / "b", "--methods", "source,bn", "--roi", "none",
                  "--scale", "none", targets=target) == 0
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert a["config"]["roi"] == b["config"]["roi"] == "none"
    for ra, rb in zip(a["results"], b["results"]):
        strip = [[{k: v for k, v in i.items() if k != "time_s"} for i in r["images"]]
                 for r in (ra, rb)]
        assert strip[0] == strip[1] and all("roi" not in i for i in strip[0])
    # and the crops are scored as they come: the source rows by an independent loop
    for row in _rows(a, "source"):
        x, t = load_pair(root / row["file"], root / row["file"].replace("/image/", "/mask/")
                         .replace(".jpg", ".png"), SIZE)
        pred = _source_pred(model, x)
        assert row["dice_od"] == metrics.dice(pred[0], t[0])
        assert row["dice_oc"] == metrics.dice(pred[1], t[1])


def test_segment_photograph_returns_the_full_mask_and_a_record(whole, model):
    name = f"{TARGET}/test/image/{TARGET}_test_0000.png"
    photo = np.asarray(Image.open(whole / name).convert("RGB"))
    mask, record = segment_photograph(photo, lambda x: _source_pred(model, x), SIZE)
    _, box, _ = roi.prepare(photo)
    _, full = _by_hand(model, whole / name, whole / name.replace("/image/", "/mask/"), box)
    assert mask.shape == photo.shape[:2] and mask.dtype == np.uint8
    assert np.array_equal(mask < 255, full[0] | full[1]) and np.array_equal(mask == 0, full[1])
    assert record["box"] == list(box) and record["score"] >= roi.SCORE_THRESHOLD
    assert record["vcdr"] == pytest.approx(metrics.vertical_cdr(full), abs=1e-4)
    json.dumps(record, allow_nan=False)


def test_photo_overlay_keeps_the_aspect_and_draws_the_box():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 60, (1000, 1600, 3), dtype=np.uint8)
    pred = np.zeros((2, 1000, 1600), bool)
    pred[0, 400:600, 300:500] = True
    box = (200, 300, 600, 700)
    img = np.asarray(photo_overlay(pixels, pred, pred, box))
    assert img.shape == (640, 1024, 3)  # 1024 wide, aspect 1000/1600 kept
    k = 1024 / 1600
    assert (img[round(300 * k) + 1, round(200 * k) + 5:round(600 * k) - 5] == BOX_COLOUR).all()
    # the prediction is drawn where it was, scaled: a green tint inside, none far away
    assert img[round(500 * k), round(400 * k), 1] > img[round(500 * k), round(400 * k), 0]
    assert (img[900 * 640 // 1000, 1500 * 1024 // 1600] == np.asarray(
        Image.fromarray(pixels).resize((1024, 640), Image.BILINEAR))[900 * 640 // 1000,
                                                                   1500 * 1024 // 1600]).all()


def test_synth_whole_through_the_command_line(tmp_path, capsys):
    assert main(["synth", "--whole", "--width", "256", "--seed", "1",
                 "--out", str(tmp_path / "w")]) == 0
    ref = synth_whole.generate_whole(tmp_path / "ref", seed=1, size=256, progress=False)
    got = json.loads((tmp_path / "w" / "synth.json").read_text())
    assert got == json.loads((tmp_path / "ref" / "synth.json").read_text())
    for rel in got["discs"]:
        a, b = Image.open(tmp_path / "w" / rel), Image.open(tmp_path / "ref" / rel)
        assert a.size == b.size == (256, 200)
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert ref["images"] == len(got["discs"]) == 8 * (1 + len(synth_whole.TARGET_DOMAINS))
    assert main(["synth", "--width", "256", "--out", str(tmp_path / "x")]) == 2
    assert "--width goes with --whole" in capsys.readouterr().err


def test_whole_and_roi_mistakes_are_one_line(whole, tmp_path, capsys):
    assert _adapt(whole, tmp_path / "a", "--whole") == 2
    assert "--whole" in capsys.readouterr().err
    assert main(["adapt", "--whole", "--roi", "none", "--out", str(tmp_path / "b")]) == 2
    assert "--roi auto" in capsys.readouterr().err
    assert _adapt(whole, tmp_path / "c", "--roi", "auto", "--roi-threshold", "2") == 2
    assert "--roi-threshold" in capsys.readouterr().err


def test_oracle_against_auto_on_two_photographs(whole, model):
    spec = importlib.util.spec_from_file_location("roi_end_to_end", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    factory = engine_factory("torch", checkpoint=defaults.checkpoint(), arch="edge")
    rows = bench.compare(factory, whole, [TARGET], SIZE, ["source", "bn"])
    assert [(r["method"], r["target"], r["n"]) for r in rows] == \
        [("source", TARGET, 2), ("bn", TARGET, 2)]
    truth = json.loads((whole / "synth.json").read_text())["discs"]
    names = [f"{TARGET}/{s}/image/{TARGET}_{s}_0000.png" for s in ("train", "test")]
    oracle, auto, err = [], [], []
    for name in names:
        t = truth[name]
        mask = whole / name.replace("/image/", "/mask/")
        oracle.append(_by_hand(model, whole / name, mask,
                               roi.roi_box(None, t, t["fov"]))[0])
        info = roi.locate_disc(np.asarray(Image.open(whole / name).convert("RGB")))
        auto.append(_by_hand(model, whole / name, mask,
                             roi.roi_box(None, info, info["fov"]))[0])
        err.append(np.hypot(info["cx"] - t["cx"], info["cy"] - t["cy"]) / (2 * t["ry"]))
    source = rows[0]

    def mean(rows_):
        return np.mean([(r["dice_od"] + r["dice_oc"]) / 2 for r in rows_])

    assert source["dice_oracle"] == pytest.approx(mean(oracle), abs=1e-9)
    assert source["dice_auto"] == pytest.approx(mean(auto), abs=1e-9)
    assert source["rejected"] == 0 and source["held"] == 1.0
    assert source["err_dd"] == pytest.approx(np.median(err), abs=1e-3)  # record rounds to 0.01 px
    assert "oracle" in bench.table(rows)


def test_stream_roi_with_known_discs_cuts_at_the_truth(whole):
    truth = json.loads((whole / "synth.json").read_text())["discs"]
    samples = list(stream_domain(whole, TARGET, SIZE, roi=RoiOptions(discs=truth)))
    for s in samples:
        t = truth[s.name]
        assert s.photo.box == roi.roi_box(None, t, t["fov"])
        assert s.image.shape == (3, SIZE, SIZE) and s.photo.target.shape[1:] == s.photo.shape


def test_run_without_roi_keeps_crops(tmp_path):
    # adapt.run's default is the crop stream: a sample carries no photograph
    root = tmp_path / "crops"
    generate(root, seed=3, n_source=(1, 0), n_target=(1, 0), size=SIZE, progress=False)
    seen = []
    adapt.run(engine_factory("torch", checkpoint=defaults.checkpoint(), arch="edge"), root,
              ["Handheld"], SIZE, ["source"], progress=False,
              on_image=lambda m, t, row, pred, s: seen.append((pred.shape, s.photo)))
    assert seen == [((2, SIZE, SIZE), None)]


def test_the_decoding_limit_holds_for_photographs(whole, tmp_path, monkeypatch):
    from grata.decode import load_photo_pair
    name = f"{TARGET}/test/image/{TARGET}_test_0000.png"
    mask = whole / name.replace("/image/", "/mask/")
    pixels, target = load_photo_pair(whole / name, mask)
    assert pixels.shape == (400, 512, 3) and target.shape == (2, 400, 512)
    m = np.asarray(Image.open(mask))
    assert np.array_equal(target[0], m < 255) and np.array_equal(target[1], m == 0)
    monkeypatch.setenv("GRATA_MAX_PIXELS", "100000")  # 512 x 400 is above: skipped rows
    samples = list(stream_domain(whole, TARGET, SIZE, roi=RoiOptions()))
    assert len(samples) == 2 and all("decoding limit" in s.reason for s in samples)


def test_help_teaches_whole_photographs(capsys):
    with pytest.raises(SystemExit):
        main(["adapt", "--help"])
    text = capsys.readouterr().out
    assert "--roi {none,auto}" in text and "grata adapt --whole --out" in text
    assert "--roi-threshold" in text

"""The disc-scale stage of the per-image pipeline (`grata.scale_stage.ScaleLocator`) against
the hand-built source model of tests/test_scale_search.py (it segments the true disc only
near the trained size), and `grata adapt --scale auto` scored at each crop's own
resolution against a recomputation with the torch model itself."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grata import defaults, metrics
from grata.cli import main
from grata.decode import load_image, load_photo_pair, photo_input
from grata.disc_scale import DiscScale, disc_geometry
from grata.domains import domain_entries
from grata.models import ResUnet, load_checkpoint, save_checkpoint, set_norm_mode
from grata.placement import Placement
from grata.scale_search import recrop
from grata.scale_stage import ScaleLocator
from grata.synth import SOURCE_DOMAIN, generate
from test_scale_search import SCALE, SIZE, Oracle, scene


def logits_of(oracle):
    """The oracle's probabilities as logits (the locator takes an engine's logits)."""
    def predict(x):
        p = oracle(x)
        return np.log(p) - np.log1p(-p)
    return predict


def true_disc(side, cx, cy, d):
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= (d / 2) ** 2


def test_a_small_disc_is_boxed_and_its_prediction_lands_in_the_crops_frame():
    side, cx, cy, d = 200, 80.0, 110.0, 30.0  # 0.15 of the side: the model misses it
    img = scene(side, cx, cy, d)
    oracle = Oracle()
    assert not (oracle(photo_input(img, SIZE))[0] >= 0.5).any()  # as given: nothing
    loc = ScaleLocator(SIZE, SCALE, logits_of(oracle))
    x, pl = loc.locate(img, "small.png")
    assert isinstance(pl, Placement) and pl.shape == (side, side)
    x0, y0, x1, y1 = pl.box
    assert x1 - x0 == y1 - y0 == pytest.approx(d / SCALE.diameter, rel=0.1)
    assert ((x0 + x1) / 2, (y0 + y1) / 2) == pytest.approx((cx, cy), abs=3)
    assert np.array_equal(x, recrop(img, pl.box, SIZE))
    rec = pl.fields()["scale"]
    assert rec["box"] == list(pl.box) and rec["how"] == "per-image"
    assert rec["factor"] == pytest.approx(side / (y1 - y0), abs=1e-3)
    assert rec["n_forward"] >= 3 and rec["reason"] == ""  # as given, refined, the check
    full = pl.paste(Oracle()(x))  # the model finds the disc on the box ...
    assert full.shape == (2, side, side)
    truth = true_disc(side, cx, cy, d)  # ... and it lands on the true disc
    assert metrics.dice(full[0], truth) > 85
    gx, gy, gd = disc_geometry(full[0])
    assert (gx, gy) == pytest.approx((cx, cy), abs=2) and gd == pytest.approx(d, rel=0.15)


def test_a_crop_at_the_models_scale_is_the_plain_resize(tmp_path):
    img = scene(100, 50, 50, 34)
    Image.fromarray(img).save(tmp_path / "c.png")
    loc = ScaleLocator(SIZE, SCALE, logits_of(Oracle()))
    x, pl = loc.locate(img, "c.png")
    assert pl.box == (0, 0, 100, 100) and pl.record["how"] == "as-given"
    assert pl.record["factor"] == 1.0 and pl.record["n_forward"] == 1
    assert np.array_equal(x, load_image(tmp_path / "c.png", SIZE))  # bit for bit


def test_a_flat_image_is_segmented_as_given_with_the_reason():
    img = np.full((90, 120, 3), 77, np.uint8)
    x, pl = ScaleLocator(SIZE, SCALE, logits_of(Oracle())).locate(img, "flat.png")
    assert pl.box == (0, 0, 120, 90) and pl.shape == (90, 120)
    assert pl.record["how"] == "fallback-none" and "flat" in pl.record["reason"]
    assert np.array_equal(x, photo_input(img, SIZE))


def test_reset_forgets_the_streams_estimate():
    loc = ScaleLocator(SIZE, SCALE, logits_of(Oracle()))
    for seed in range(3):
        loc.locate(scene(200, 90 + 5 * seed, 100, 30, seed=seed), f"{seed}.png")
    assert loc.stream.settled
    assert loc.stream.estimate() == pytest.approx(30 / 200, rel=0.1)
    _, pl = loc.locate(scene(200, 100, 95, 30, seed=9), "next.png")
    assert pl.record["how"] == "stream"  # a settled stream skips the search
    loc.reset()
    assert not loc.stream.settled and loc.stream.estimate() is None
    _, pl = loc.locate(scene(200, 100, 95, 30, seed=9), "next.png")
    assert pl.record["how"] == "per-image"


def test_a_settled_stream_at_the_models_scale_centres_an_off_centre_disc_in_one_pass():
    """One camera at the model's scale whose discs sit far off centre: once settled, the
    pass on the crop as given sees the disc whole and plausible but for its place, so the
    box is centred on it at its own size without a check (one pass per image), and the
    disc lands where it is."""
    oracle = Oracle()
    loc = ScaleLocator(SIZE, SCALE, logits_of(oracle))
    side, d = 200, 0.34 * 200
    for i in range(3):
        loc.locate(scene(side, 100, 100, d, seed=i), f"centred{i}.png")
    assert loc.stream.settled
    cx, cy = 150.0, 60.0  # a third of the side off centre
    img = scene(side, cx, cy, d, seed=7)
    before = oracle.calls
    x, pl = loc.locate(img, "off.png")
    rec = pl.record
    assert oracle.calls - before == 1 and rec["n_forward"] == 1
    assert rec["how"] == "per-image"
    x0, y0, x1, y1 = pl.box
    assert ((x0 + x1) / 2, (y0 + y1) / 2) == pytest.approx((cx, cy), abs=3)
    assert x1 - x0 == pytest.approx(d / SCALE.diameter, rel=0.1)
    full = pl.paste(Oracle()(x))
    assert metrics.dice(full[0], true_disc(side, cx, cy, d)) > 85


def test_a_stream_whose_scale_stops_fitting_switches_within_a_few_images():
    """A settled stream of small discs (0.15 of the side), then crops whose disc is larger
    than the model's training discs (0.5 of the side, seen as given by a model that finds
    discs up to 0.55): the stream's box, cut inside the disc, shows a less plausible disc
    than the crop as given, so each is searched on its own and boxed right, and after
    `switch` (3) such crops the stream follows the new scale (the stream shortcut)."""
    loc = ScaleLocator(SIZE, SCALE, logits_of(Oracle(hi=0.55)))
    for seed in range(3):
        loc.locate(scene(200, 90 + 5 * seed, 100, 30, seed=seed), f"small{seed}.png")
    assert loc.stream.estimate() == pytest.approx(0.15, rel=0.1)
    side, d = 200, 0.5 * 200
    for i in range(3):
        cx = 96.0 + 3 * i
        _, pl = loc.locate(scene(side, cx, 100, d, seed=10 + i), f"big{i}.png")
        rec = pl.record
        assert rec["how"] == "per-image" and rec["reason"] == "the stream's scale did not fit"
        x0, y0, x1, y1 = pl.box
        assert x1 - x0 == pytest.approx(d / SCALE.diameter, rel=0.12)
        assert (x0 + x1) / 2 == pytest.approx(cx, abs=4)
        truth = true_disc(side, cx, 100, d)
        assert metrics.dice(pl.paste(Oracle()(recrop(scene(side, cx, 100, d, seed=10 + i),
                                                     pl.box, SIZE)))[0], truth) > 85
    assert loc.stream.estimate() == pytest.approx(0.5, rel=0.12)  # switched
    _, pl = loc.locate(scene(side, 100, 100, d, seed=20), "big3.png")
    assert pl.record["how"] == "stream" and pl.record["n_forward"] <= 2


# ----------------------------------------------------------------------------- grata adapt

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small synthetic benchmark (crops of 160 pixels) and an untrained edge model
    (without a disc scale)."""
    root = tmp_path_factory.mktemp("bench")
    generate(root / "data", seed=3, n_source=(2, 1), n_target=(2, 1), size=160, progress=False)
    save_checkpoint(ResUnet("edge"), root / "edge.pt")
    return root


def adapt_args(tiny, out, *extra, model=()):
    model = model or ["--checkpoint", str(tiny / "edge.pt"), "--arch", "edge", "--size", "64"]
    return ["adapt", "--data", str(tiny / "data"), "--source", SOURCE_DOMAIN,
            "--targets", "FarCrop", *model, "--engine", "torch", "--methods", "source",
            "--norm", "source", "--quiet", "--out", str(out), *extra]


def test_adapt_scale_auto_records_the_decision_and_scores_at_native_size(tiny, tmp_path):
    import torch
    # The shipped model (its disc scale beside it) on crops of another clinic's scale.
    rc = main(adapt_args(tiny, tmp_path / "run", "--scale", "auto", model=["--size", "128"]))
    assert rc == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["scale"] == "auto"
    assert report["config"]["disc_scale"] == defaults.disc_scale().to_json()
    (result,) = report["results"]
    assert result["n_images"] == 3
    model = load_checkpoint(defaults.checkpoint(), "edge").eval()
    set_norm_mode(model, "running")
    rows = {r["file"]: r for r in result["images"]}
    entries, _ = domain_entries(tiny / "data", "FarCrop")
    assert sorted(rows) == sorted(e.name for e in entries)
    for e in entries:
        row, rec = rows[e.name], rows[e.name]["scale"]
        assert set(rec) >= {"box", "factor", "how", "n_forward", "reason"}
        pixels, truth = load_photo_pair(e.image_path, e.mask_path)
        assert truth.shape[1:] == (160, 160)  # the crop's own resolution, not the model's
        # The same chain by hand: the recorded box cut, the model, pasted back, scored.
        x = recrop(pixels, tuple(rec["box"]), 128)
        with torch.no_grad():
            p = torch.sigmoid(model(torch.from_numpy(x[None])))[0].numpy()
        full = Placement((160, 160), tuple(rec["box"])).paste(p)
        assert row["dice_od"] == pytest.approx(metrics.dice(full[0], truth[0]), abs=1e-3)
        assert row["dice_oc"] == pytest.approx(metrics.dice(full[1], truth[1]), abs=1e-3)
    assert any(r["scale"]["how"] != "fallback-none" for r in rows.values())
    assert result["dice_od"] > 50  # the model found the discs


def test_adapt_locates_each_image_once_for_every_method(tiny, tmp_path, monkeypatch):
    """Three methods, three images: three locate calls (not nine), one box per image for
    every method, and the overlay draws the located box, not the whole crop."""
    from grata import scale_stage
    from grata.cli import roi_args
    calls, boxes = [], []
    real = scale_stage.ScaleLocator.locate

    def counted(self, picture, name="image"):
        calls.append(name)
        return real(self, picture, name)

    def drawn(pixels, pred, target, box):
        boxes.append(tuple(box))
        return Image.new("RGB", (8, 8))

    monkeypatch.setattr(scale_stage.ScaleLocator, "locate", counted)
    monkeypatch.setattr(roi_args, "photo_overlay", drawn)
    args = adapt_args(tiny, tmp_path / "run", "--scale", "auto", "--overlays",
                      model=["--size", "128"])
    args[args.index("--methods") + 1] = "source,bn,grata"
    assert main(args) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(calls) == 3 and len(set(calls)) == 3
    per_file = {}
    for result in report["results"]:
        for r in result["images"]:
            per_file.setdefault(r["file"], set()).add(tuple(r["scale"]["box"]))
    assert len(per_file) == 3 and all(len(b) == 1 for b in per_file.values())
    assert len(boxes) == 9
    assert set(boxes) == {b for bs in per_file.values() for b in bs}
    assert any(b != (0, 0, 160, 160) for b in boxes)  # some crop was re-cropped


def test_scale_auto_is_the_default_and_paper_keeps_the_crops_as_given(tiny, tmp_path):
    """Without --scale the shipped model (its disc scale known) runs behind the stage;
    --paper is the paper's protocol: the crops as given, scored at the model's size."""
    assert main(adapt_args(tiny, tmp_path / "default", model=["--size", "128"])) == 0
    report = json.loads((tmp_path / "default" / "report.json").read_text())
    assert report["config"]["scale"] == "auto"
    assert all("scale" in r for r in report["results"][0]["images"])
    assert main(adapt_args(tiny, tmp_path / "paper", "--paper", model=["--size", "128"])) == 0
    report = json.loads((tmp_path / "paper" / "report.json").read_text())
    assert report["config"]["scale"] == "none"
    assert all("scale" not in r for r in report["results"][0]["images"])


def test_adapt_scale_unknown_runs_unscaled_and_mistakes_are_one_line(tiny, tmp_path, capsys):
    rc = main(adapt_args(tiny, tmp_path / "plain", "--scale", "auto"))
    assert rc == 0
    assert "disc scale: unknown" in capsys.readouterr().err
    report = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert report["config"]["scale"] == "none"
    assert all("scale" not in r for r in report["results"][0]["images"])
    for extra, words in [(["--scale", "none", "--disc-scale", "0.3"],
                          "--disc-scale goes with --scale auto"),
                         (["--paper", "--disc-scale", "0.3"],
                          "--disc-scale goes with --scale auto")]:
        assert main(adapt_args(tiny, tmp_path / "bad", *extra)) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
    # --scale auto with --roi auto is no longer refused: whole photographs at the model's
    # scale (tests/test_photo_scale.py); a model without a scale cuts the benchmark's ROI
    assert main(adapt_args(tiny, tmp_path / "whole", "--scale", "auto", "--roi", "auto")) == 0
    err = capsys.readouterr().err
    assert "is for crops" not in err and "disc scale: unknown" in err
    report = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert report["config"]["roi"] == "auto" and report["config"]["scale"] == "none"


# ----------------------------------------------------------------------------- grata serve

def test_serve_scale_auto_records_the_box_and_pastes_into_the_crops_frame(tiny, tmp_path):
    from grata.artifacts import default_artifacts
    from grata.masks import to_mask_png
    from grata.metrics import binarize, probs_from_logits
    from grata.runtime import OrtEngine
    from grata.scale_search import locate_disc, prefer_scaled
    art = default_artifacts()[0]  # the shipped model: its disc scale in the manifest
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    entries, _ = domain_entries(tiny / "data", "FarCrop")  # discs smaller than trained
    crops = {}
    for k, e in enumerate(entries):
        crops[f"c{k}.png"], _ = load_photo_pair(e.image_path, e.mask_path)
        Image.fromarray(crops[f"c{k}.png"]).save(inbox / f"c{k}.png")
    rc = main(["serve", "--inbox", str(inbox), "--outbox", str(outbox), "--artifacts",
               str(art), "--method", "source", "--predictor", "onnxruntime", "--device",
               "cpu", "--once", "--settle", "0.1", "--poll", "0.02", "--stable-for", "0",
               "--quiet", "--scale", "auto"])
    assert rc == 0
    engine = OrtEngine(art)  # the source model, independently
    scale = DiscScale.from_json(engine.manifest["disc_scale"])

    def logits(x):
        return engine.infer(engine.to_input(x), norm="source")

    records = [json.loads(r.read_text()) for r in outbox.glob("*.json")]
    assert sorted(r["image"] for r in records) == sorted(crops)
    for record in records:
        img = crops[record["image"]]
        # three images: the stream settles only after them, each is placed on its own
        want = locate_disc(img, logits, scale, engine.size, logits=True)
        box = want.box
        if not want.identity and not prefer_scaled(
                want, probs_from_logits(logits(recrop(img, box, engine.size))[0]), scale):
            box = (0, 0, img.shape[1], img.shape[0])  # the box missed: kept as given
        assert record["scale"]["box"] == list(box)
        pred = binarize(probs_from_logits(logits(recrop(img, box, engine.size))[0]))
        mask = np.asarray(Image.open(outbox / record["files"]["mask"]))
        assert mask.shape == img.shape[:2] == (160, 160)  # the crop's own size
        np.testing.assert_array_equal(
            mask, to_mask_png(Placement(img.shape[:2], box).paste(pred)))
        assert record["image_size"] == [img.shape[1], img.shape[0]]
    assert any(r["scale"]["how"] == "per-image" and r["scale"]["factor"] > 1.2
               for r in records)  # a disc found and magnified


def test_serve_state_keeps_the_streams_scale_and_old_states_load(tiny, edge64, tmp_path):
    from grata.artifacts import default_artifacts
    from grata.runtime.adaptive import AdaptiveModel
    art, state = default_artifacts()[0], tmp_path / "state"
    kw = dict(method="source", predictor="onnxruntime", device="cpu", threads=1)
    entries, _ = domain_entries(tiny / "data", "FarCrop")
    crop_file = entries[0].image_path  # a disc the stage measures (a plausible estimate)
    with AdaptiveModel(art, state, **kw) as plain:  # a state from before the stage
        assert plain.scale_locator is None and plain.config["scale"] == "none"
    with AdaptiveModel(art, state, scale="auto", **kw) as m:
        assert m.scale_locator.stream.estimate() is None  # the old state loaded, no scale
        for rel in (0.2, 0.21, 0.19):
            m.scale_locator.stream.update(rel)
        m.checkpoint()
    with AdaptiveModel(art, state, scale="auto", **kw) as again:
        s = again.scale_locator.stream
        assert s.settled and list(s.accepted) == [0.2, 0.21, 0.19]
        before = s.state()
        again.recover(crop_file, name="c.png")  # a recovered image leaves the state as is
        assert again.scale_locator.stream.state() == before
        again.process(crop_file, name="c.png")  # a served one moves it
        assert again.scale_locator.stream.state() != before
        again.reset()
        assert not again.scale_locator.stream.settled  # reset with the stream
    with AdaptiveModel(edge64[1], None, scale="auto", **kw) as unknown:  # no disc scale
        assert unknown.scale_locator is None and "unknown" in unknown.scale_line


# ----------------------------------------------------------------------------- bad input

def no_disc_crop(side=160, seed=0):
    """Retina-coloured texture without a disc: nothing bright to find."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    base = np.stack([0.55 + 0.05 * np.sin(6 * xx), 0.22 + 0.02 * np.cos(5 * yy),
                     0.09 + 0 * xx], -1)
    img = np.clip(base + 0.02 * rng.standard_normal((side, side, 3)), 0, 1)
    return (img * 255).astype(np.uint8)


def test_adapt_scale_auto_bad_input_is_one_line_each_and_the_stream_goes_on(
        tiny, tmp_path, capsys, monkeypatch):
    """One stream: a crop without a disc, a flat one, one whose mask is missing, a
    20000 x 20000 photograph, three FarCrop crops, then a crop without a disc again."""
    import shutil

    from hostile import huge_png
    monkeypatch.delenv("GRATA_MAX_PIXELS", raising=False)
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    folder = data / "Bad"
    (folder / "mask").mkdir(parents=True)
    (folder / "image").mkdir()
    Image.fromarray(no_disc_crop()).save(folder / "image" / "nodisc.png")
    Image.fromarray(no_disc_crop(seed=2)).save(folder / "image" / "nodisc2.png")
    Image.fromarray(np.full((160, 160, 3), 90, np.uint8)).save(folder / "image" / "flat.png")
    Image.fromarray(no_disc_crop(seed=1)).save(folder / "image" / "nomask.png")
    (folder / "image" / "huge.png").write_bytes(huge_png(20000, 20000))
    for name in ("nodisc", "nodisc2", "flat"):
        Image.fromarray(np.full((160, 160), 255, np.uint8)).save(folder / "mask" / f"{name}.png")
    (folder / "mask" / "huge.png").write_bytes(huge_png(20000, 20000))
    entries, _ = domain_entries(data, "FarCrop")
    rows = [(f"Bad/image/{n}.png", f"Bad/mask/{n}.png") for n in ("nodisc", "flat",
                                                                  "nomask", "huge")]
    rows += [(e.name, e.mask_path.relative_to(data).as_posix()) for e in entries]
    rows += [("Bad/image/nodisc2.png", "Bad/mask/nodisc2.png")]
    (data / "Bad_test.csv").write_text("image,mask\n" + "".join(f"{a},{b}\n" for a, b in rows))
    args = adapt_args(tiny, tmp_path / "run", "--scale", "auto", model=["--size", "128"])
    args[args.index("--data") + 1] = str(data)
    args[args.index("--targets") + 1] = "Bad"
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (result,) = json.loads((tmp_path / "run" / "report.json").read_text())["results"]
    scored = {Path(r["file"]).name: r["scale"] for r in result["images"]}
    # the stream went on past every bad file, in order
    assert list(scored) == ["nodisc.png", "flat.png", *(Path(e.name).name for e in entries),
                            "nodisc2.png"]
    rec = scored["nodisc.png"]  # a new stream: searched at every scale, not found
    assert rec["how"] == "fallback-none" and rec["box"] == [0, 0, 160, 160], str(rec)
    assert rec["reason"] in ("no disc found at any scale",
                             "no plausible disc (best plausibility 0.00)"), rec
    assert 3 <= rec["n_forward"] <= 16
    assert (scored["flat.png"]["how"], scored["flat.png"]["n_forward"],
            scored["flat.png"]["reason"]) == ("fallback-none", 0, "flat image: nothing to locate")
    assert all(scored[Path(e.name).name]["how"] != "fallback-none" for e in entries)
    # once the stream has an estimate, a crop without a disc takes the stream's scale with
    # nothing found (confidence 0) and says so
    rec = scored["nodisc2.png"]
    assert rec["confidence"] == 0.0 and rec["reason"], str(rec)
    skipped = {Path(s["file"]).name: s["reason"] for s in result["skipped"]}
    assert set(skipped) == {"nomask.png", "huge.png"}
    assert "mask file" in skipped["nomask.png"] and "does not exist" in skipped["nomask.png"]
    assert skipped["huge.png"].endswith(
        "image is 400 MP, above the decoding limit of 40 MP (GRATA_MAX_PIXELS)")
    assert all("\n" not in why for why in skipped.values())
    # the HTML report shows each image's decision beside its overlay
    from grata.report_html import write_adapt_html
    page = write_adapt_html(tmp_path / "run", plots=False).read_text()
    assert ("fallback-none \u00d71.00 box 0,0,160,160: flat image: nothing to locate"
            in page)
    x0, y0, x1, y1 = scored["FarCrop_test_0000.png"]["box"]
    assert f"box {x0},{y0},{x1},{y1}<" in page


def test_serve_scale_auto_bad_input_is_one_line_each_and_the_stream_goes_on(
        tiny, tmp_path, capsys, monkeypatch):
    import os
    import time

    from grata.artifacts import default_artifacts
    from hostile import huge_png
    monkeypatch.delenv("GRATA_MAX_PIXELS", raising=False)
    art = default_artifacts()[0]
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    entries, _ = domain_entries(tiny / "data", "FarCrop")
    Image.fromarray(no_disc_crop()).save(inbox / "a_nodisc.png")
    Image.fromarray(np.full((160, 160, 3), 90, np.uint8)).save(inbox / "b_flat.png")
    (inbox / "c_huge.png").write_bytes(huge_png(20000, 20000))
    Image.fromarray(load_photo_pair(entries[0].image_path, entries[0].mask_path)[0]).save(
        inbox / "d_crop.png")
    base = time.time_ns() - 10**12
    for i, name in enumerate(sorted(os.listdir(inbox))):  # arrival order = name order
        os.utime(inbox / name, ns=(base + i * 10**7, base + i * 10**7))
    rc = main(["serve", "--inbox", str(inbox), "--outbox", str(outbox), "--artifacts",
               str(art), "--method", "source", "--predictor", "onnxruntime", "--device",
               "cpu", "--once", "--settle", "0.1", "--poll", "0.02", "--stable-for", "0",
               "--scale", "auto"])
    assert rc == 0
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if ln.startswith("'")]
    assert [ln.split(":")[0] for ln in lines] == \
        ["'a_nodisc.png'", "'b_flat.png'", "'c_huge.png'", "'d_crop.png'"]
    assert lines[2] == ("'c_huge.png': rejected: image is 400 MP, above the decoding "
                        "limit of 40 MP (GRATA_MAX_PIXELS)")
    assert "Traceback" not in out.err
    records = {json.loads(p.read_text())["image"]: json.loads(p.read_text())
               for p in outbox.glob("*.json")}
    assert sorted(records) == ["a_nodisc.png", "b_flat.png", "d_crop.png"]
    rec = records["a_nodisc.png"]["scale"]
    assert rec["how"] == "fallback-none" and rec["reason"].startswith("no ")
    assert records["b_flat.png"]["scale"]["reason"] == "flat image: nothing to locate"
    assert records["d_crop.png"]["scale"]["how"] != "fallback-none"
    assert (inbox / "rejected" / "c_huge.png").exists()
    from grata.report_html import write_serve_html
    page = write_serve_html(outbox).read_text()
    assert ("fallback-none \u00d71.00 box 0,0,160,160: flat image: nothing to locate"
            in page)
    x0, y0, x1, y1 = records["d_crop.png"]["scale"]["box"]
    assert f"box {x0},{y0},{x1},{y1}<" in page

"""grata serve --roi auto: whole photographs in, the disc found, the ROI segmented, the mask
pasted back at the photograph's size; a photograph without a disc rejected with the reason."""

import json

import numpy as np
import pytest
from PIL import Image

from grata import synth_whole
from grata.cli import main
from grata.metrics import binarize, probs_from_logits
from grata.photo import segment_photograph
from grata.runtime import OrtEngine


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    synth_whole.generate_whole(root, seed=4, n_source=(0, 0), n_target=(1, 1), size=512,
                               progress=False)
    return sorted(p for p in root.rglob("image/*") if p.suffix in (".png", ".jpg"))[:2]


def test_serve_roi_auto_pastes_the_source_prediction_back_and_rejects_a_blank(
        photos, edge64, tmp_path):
    art = edge64[1]
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    for k, p in enumerate(photos):
        (inbox / f"eye{k}{p.suffix}").write_bytes(p.read_bytes())
    Image.new("RGB", (400, 300)).save(inbox / "black.png")
    rc = main(["serve", "--inbox", str(inbox), "--outbox", str(outbox), "--artifacts",
               str(art), "--method", "source", "--predictor", "onnxruntime", "--device",
               "cpu", "--once", "--settle", "0.1", "--poll", "0.02", "--stable-for", "0",
               "--quiet", "--roi", "auto"])
    assert rc == 0
    engine = OrtEngine(art)  # the source model, independently: no adaptation, stored stats

    def predict_crop(x):
        return binarize(probs_from_logits(engine.infer(engine.to_input(x), norm="source")[0]))

    for k, p in enumerate(photos):
        record = next(json.loads(r.read_text()) for r in outbox.glob("*.json")
                      if json.loads(r.read_text())["image"] == f"eye{k}{p.suffix}")
        pixels = np.asarray(Image.open(p).convert("RGB"))
        want, info = segment_photograph(pixels, predict_crop, engine.size)
        mask = np.asarray(Image.open(outbox / record["files"]["mask"]))
        assert mask.shape == pixels.shape[:2]  # the photograph's own size
        np.testing.assert_array_equal(mask, want)
        assert record["roi"]["box"] == info["box"] and record["roi"]["score"] >= 0.5
        assert record["image_size"] == [pixels.shape[1], pixels.shape[0]]
        x0, y0, x1, y1 = info["box"]
        outside = np.ones(mask.shape, bool)
        outside[max(y0, 0):y1, max(x0, 0):x1] = False
        assert (mask[outside] == 255).all()  # background outside the ROI box
        overlay = Image.open(outbox / record["files"]["overlay"])
        assert abs(overlay.size[0] / overlay.size[1] - pixels.shape[1] / pixels.shape[0]) < 0.02
    reason = (inbox / "rejected" / "black.png.reason.txt").read_text()
    line = next(ln for ln in reason.splitlines() if ln.startswith("reason:"))
    assert "not found" in line or "field of view" in line, line


def test_serve_roi_mistakes_are_one_line(edge64, tmp_path, capsys):
    inbox = tmp_path / "in"
    inbox.mkdir()
    rc = main(["serve", "--inbox", str(inbox), "--outbox", str(tmp_path / "out"),
               "--artifacts", str(edge64[1]), "--once", "--roi-threshold", "0.3"])
    assert rc == 2 and "--roi-threshold goes with --roi auto" in capsys.readouterr().err

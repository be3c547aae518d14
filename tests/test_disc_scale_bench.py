"""benchmarks/disc_scale.py: the table runs on a small benchmark, its ceiling is scored
against the truth in the frame of the image as given, a model without a scale is a
user error."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from grata import defaults
from grata.decode import load_photo_pair
from grata.domains import domain_entries
from grata.disc_scale import DiscScale, disc_geometry
from grata.scale_search import paste_back, recrop, square_box
from grata.synth import generate

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "disc_scale.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("disc_scale_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "d"
    generate(root, seed=1, n_source=(1, 0), n_target=(2, 1), size=160, progress=False)
    return root


def test_table_on_a_small_benchmark(bench, small, tmp_path, capsys):
    rc = bench.main(["--data", str(small), "--source", "Clinic", "--targets",
                     "FarCrop,OffCentre", "--engine", "torch", "--quiet",
                     "--json", str(tmp_path / "t.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "FarCrop" in out and "mean over targets" in out and "below given" in out
    table = json.loads((tmp_path / "t.json").read_text())["table"]
    assert set(table) == {"FarCrop", "OffCentre"}
    for row in table.values():
        assert row["n_images"] == 3
        for v in bench.VARIANTS:
            assert 0 <= row[v]["od"] <= 100 and 0 <= row[v]["oc"] <= 100
        assert row["passes_image"] >= 1 and row["passes_stream"] >= 1


def test_a_perfect_model_scores_100_at_the_ceiling(bench, small):
    """With a model that segments the true disc of whatever it is shown, every column is
    scored in the frame of the image as given: the ceiling's box and paste-back lose
    only resampling."""
    entry = domain_entries(small, "FarCrop")[0][0]
    pixels, truth = load_photo_pair(entry.image_path, entry.mask_path)
    scale = DiscScale(0.344, 0.297, 0.406, 0.064, 0.106, 80)
    cx, cy, d = disc_geometry(truth[0])
    box = square_box(cx, cy, d / scale.diameter)
    # the truth, cut and resized like the image: what a perfect model would answer
    mask = np.stack([t.astype(np.uint8) * 255 for t in truth], axis=-1)
    perfect = recrop(np.concatenate([mask, mask[..., :1]], axis=-1), box, 128)[:2]
    got = bench.score(paste_back(perfect, box, truth.shape[1:]), truth)
    assert got[0] > 97 and got[1] > 93


def test_a_model_without_a_scale_is_a_user_error(bench, small, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(defaults.checkpoint().read_bytes())  # no .scale.json beside it
    rc = bench.main(["--data", str(small), "--source", "Clinic", "--checkpoint", str(ckpt),
                     "--engine", "torch", "--quiet"])
    assert rc == 2 and "unknown" in capsys.readouterr().err


def test_served_predictions_are_scored_on_the_locators_boxes(bench, small):
    """--norm: the scored predictions come from `served` while the source model decides
    the boxes: the passes and decisions equal the plain run's; a `served` that answers
    background everywhere scores 0 in every column."""
    from grata.models import load_checkpoint, set_norm_mode
    import torch
    from tqdm import tqdm
    model = load_checkpoint(defaults.checkpoint(), defaults.DEFAULT_ARCH).eval()
    set_norm_mode(model, "running")

    def predict(x):
        with torch.no_grad():
            return torch.sigmoid(model(torch.from_numpy(x[None])))[0].numpy()

    seen = []

    def nothing(x):
        seen.append(x.shape)
        return np.zeros((2, 128, 128), np.float32)

    scale = defaults.disc_scale()
    with tqdm(disable=True) as bar:
        plain = bench.run_domain(small, "FarCrop", predict, scale, 128, "edge", bar)
        blank = bench.run_domain(small, "FarCrop", predict, scale, 128, "edge", bar,
                                 served=nothing)
    for key in ("passes_image", "passes_stream", "how_image", "how_stream"):
        assert blank[key] == plain[key]
    assert all(blank[v]["od"] < 1e-3 and blank[v]["oc"] < 1e-3 for v in bench.VARIANTS)
    assert len(seen) == 4 * 3  # given, ceiling, image, stream for each of 3 images
    assert plain["stream"]["od"] > 50


def test_norm_needs_the_onnx_engine(bench, small, capsys):
    rc = bench.main(["--data", str(small), "--source", "Clinic", "--engine", "torch",
                     "--norm", "mix:0.3", "--quiet"])
    assert rc == 2 and "--norm goes with --engine onnx" in capsys.readouterr().err

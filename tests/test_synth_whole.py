"""Synthetic whole photographs: deterministic, readable, masks agree with the recorded
discs, the ROI rule at the true disc gives crops like grata.synth's."""

import json

import numpy as np
import pytest
from PIL import Image

from grata import domains, roi, synth, synth_whole
from grata.errors import GrataError

SMALL = {"n_source": (2, 1), "n_target": (1, 1), "size": 256, "progress": False}
N_IMAGES = 3 + 2 * len(synth_whole.TARGET_DOMAINS)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole") / "a"
    return root, synth_whole.generate_whole(root, seed=5, **SMALL)


def test_same_seed_same_bytes_other_seed_differs(bench, tmp_path):
    root, summary = bench
    assert summary["images"] == N_IMAGES
    again = synth_whole.generate_whole(tmp_path / "b", seed=5, **SMALL)
    assert again["images"] == N_IMAGES
    a, b = _files(root), _files(tmp_path / "b")
    assert a.keys() == b.keys() and a == b
    synth_whole.generate_whole(tmp_path / "c", seed=6, **SMALL)
    c = _files(tmp_path / "c")
    assert all(a[k] != c[k] for k in a if "/image/" in k)


def test_csv_layout_and_full_size_masks(bench):
    root, _ = bench
    assert set(domains.list_domains(root)) == {synth.SOURCE_DOMAIN, *synth_whole.TARGET_DOMAINS}
    entries, skipped = domains.domain_entries(root, synth.SOURCE_DOMAIN)
    assert not skipped
    assert len(entries) == 3
    meta = json.loads((root / "synth.json").read_text())
    assert meta["generator"] == "grata.synth_whole" and meta["roi_fraction"] == roi.ROI_FRACTION
    for e in entries:
        img, mask = Image.open(e.image_path), Image.open(e.mask_path)
        assert img.size == mask.size == (256, 200) and img.mode == "RGB"
        assert set(np.unique(np.asarray(mask))) <= {0, 128, 255}
        assert e.name in meta["discs"]


def test_masks_agree_with_the_recorded_discs():
    for domain in (synth.SOURCE_DOMAIN, *synth_whole.TARGET_DOMAINS):
        for i in range(2):
            image, mask, t = synth_whole.render_whole(
                synth_whole._rng(1, domain, "train", i), domain, 512)
            assert image.shape == (400, 512, 3) and mask.shape == (400, 512)
            ys, xs = np.nonzero(mask < 255)
            assert abs(xs.mean() + 0.5 - t["cx"]) < 0.1 * t["rx"]
            assert abs(ys.mean() + 0.5 - t["cy"]) < 0.1 * t["ry"]
            assert len(xs) == pytest.approx(np.pi * t["rx"] * t["ry"], rel=0.15)
            cup = mask == 0
            assert 0 < cup.sum() < len(xs) and (mask[cup] == 0).all()
            # the disc is inside the FOV, on the nasal side of its centre
            f = t["fov"]
            assert np.hypot(t["cx"] - f["cx"], t["cy"] - f["cy"]) < f["d"] / 2 - t["r"]
            assert (t["cx"] > f["cx"]) == (t["eye"] == "right")
            # outside the FOV the photograph is (nearly) black
            yy, xx = np.mgrid[0:400, 0:512] + 0.5
            out = np.hypot(xx - f["cx"], yy - f["cy"]) > 0.53 * f["d"]
            if out.any():
                black = synth.DOMAINS[domain].black * 255
                assert image[out].mean() < black + 6


def test_both_eyes_and_the_macula_is_temporal():
    eyes = set()
    for i in range(8):
        image, mask, t = synth_whole.render_whole(
            synth_whole._rng(2, "Clinic", "test", i), "Clinic", 512, artefact=0.0, uneven=0.0)
        eyes.add(t["eye"])
        # the macula: 2.5 disc diameters temporal of the disc, darker than around it
        g = image[..., 1].astype(np.float32)
        dd = 2 * t["ry"]
        mx = t["cx"] + (-2.5 if t["eye"] == "right" else 2.5) * dd
        yy, xx = np.mgrid[0:400, 0:512] + 0.5
        dist = np.hypot(xx - mx, yy - t["cy"]) / dd
        f = t["fov"]
        retina = np.hypot(xx - f["cx"], yy - f["cy"]) < 0.45 * f["d"]
        assert g[(dist < 0.3) & retina].mean() < 0.9 * np.median(
            g[(dist > 1.5) & (dist < 2.0) & retina & (mask == 255)])
    assert eyes == {"left", "right"}


def test_roi_at_the_true_disc_matches_the_crop_benchmark():
    """The ROI rule at the true disc gives the disc share of the ROI that grata.synth's
    crops have for the domain."""
    for domain in (synth.SOURCE_DOMAIN, "Widefield", "Legacy"):
        lo, hi = synth.DOMAINS[domain].disc
        for i in range(3):
            _, mask, t = synth_whole.render_whole(
                synth_whole._rng(3, domain, "test", i), domain, 512)
            box = roi.roi_box(mask.shape, t, t["fov"])
            rows = np.flatnonzero((roi.crop(mask, box, fill=255) < 255).any(axis=1))
            assert lo - 0.03 <= (rows[-1] - rows[0] + 1) / (box[2] - box[0]) <= hi + 0.03


def test_bad_arguments():
    with pytest.raises(GrataError):
        synth_whole.generate_whole("unused", size=64, progress=False)
    with pytest.raises(GrataError):
        synth_whole.generate_whole("unused", n_target=(1, -1), progress=False)

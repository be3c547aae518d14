"""The synthetic benchmark: deterministic, readable by grata.data, well-formed masks,
measurably shifted target domains."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from grata import data, synth

SMALL = {"n_source": (3, 2), "n_target": (2, 1), "size": 96, "progress": False}
N_IMAGES = 3 + 2 + 3 * len(synth.TARGET_DOMAINS)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "a"
    summary = synth.generate(root, seed=3, **SMALL)
    return root, summary, None


def test_domains_declared():
    assert synth.SOURCE_DOMAIN not in synth.TARGET_DOMAINS
    assert len(synth.TARGET_DOMAINS) >= 4 and len(set(synth.TARGET_DOMAINS)) == len(
        synth.TARGET_DOMAINS)
    for name in (synth.SOURCE_DOMAIN, *synth.TARGET_DOMAINS):
        assert name in synth.__doc__


def test_same_seed_same_bytes_other_seed_differs(bench, tmp_path):
    root, _, _ = bench
    again = synth.generate(tmp_path / "b", seed=3, **SMALL)
    assert again["images"] == N_IMAGES
    a, b = _files(root), _files(tmp_path / "b")
    assert a.keys() == b.keys() and a == b
    synth.generate(tmp_path / "c", seed=4, **SMALL)
    c = _files(tmp_path / "c")
    assert c.keys() == a.keys()
    images = [k for k in a if "/image/" in k]
    assert all(a[k] != c[k] for k in images)
    assert all(a[k] == c[k] for k in a if k.endswith(".csv"))


def test_counts_do_not_change_other_images(bench, tmp_path):
    root, _, _ = bench
    synth.generate(tmp_path / "d", seed=3, n_source=(1, 3), n_target=(0, 1), size=96,
                   progress=False)
    d = _files(tmp_path / "d")
    a = _files(root)
    # an image keeps its bytes whatever the other counts are
    shared = [k for k in d if ("/image/" in k or "/mask/" in k) and k in a]
    assert len(shared) == 2 * (1 + 2 + len(synth.TARGET_DOMAINS))
    assert all(a[k] == d[k] for k in shared)
    assert "Clinic/test/image/Clinic_test_0002.png" in d


def test_layout_readable_by_data(bench):
    root, summary, _ = bench
    meta = json.loads((root / "synth.json").read_text())
    assert meta["seed"] == 3 and meta["source"] == synth.SOURCE_DOMAIN
    assert meta["version"] == synth.VERSION
    assert meta["domains"][synth.SOURCE_DOMAIN]["train"] == 3
    assert summary["domains"] == meta["domains"]
    assert data.list_domains(root) == sorted([synth.SOURCE_DOMAIN, *synth.TARGET_DOMAINS])
    for domain in (synth.SOURCE_DOMAIN, *synth.TARGET_DOMAINS):
        entries, problems = data.domain_entries(root, domain)
        n = (3, 2) if domain == synth.SOURCE_DOMAIN else (2, 1)
        assert problems == [] and len(entries) == sum(n)
        assert ["/train/" in e.name for e in entries] == [True] * n[0] + [False] * n[1]
        samples = list(data.stream_domain(root, domain, 32))
        assert all(isinstance(s, data.Sample) for s in samples)
    assert any(p.suffix == ".jpg" for p in root.rglob("*/image/*"))


def test_masks_follow_the_encoding(bench):
    root, _, _ = bench
    masks = sorted(root.rglob("*/mask/*.png"))
    assert masks
    for p in masks:
        im = Image.open(p)
        assert im.mode == "L" and im.size == (96, 96)
        m = np.asarray(im)
        assert set(np.unique(m)) == {0, 128, 255}
        cup, disc = m == 0, m < 255
        # the cup lies inside the disc: never next to background
        assert not (ndimage.binary_dilation(cup) & ~disc).any()
        rows = np.flatnonzero(disc.any(1))
        cup_rows = np.flatnonzero(cup.any(1))
        vcdr = (np.ptp(cup_rows) + 1) / (np.ptp(rows) + 1)
        assert 0.2 < vcdr < 0.95
        assert 0.12 < (np.ptp(rows) + 1) / 96 < 0.6
        img = Image.open(str(p).replace("/mask/", "/image/").replace(
            ".png", ".jpg" if "Legacy" in p.name else ".png"))
        assert img.size == im.size and img.mode == "RGB"


def test_targets_differ_in_colour_from_source(tmp_path):
    root = tmp_path / "colour"
    synth.generate(root, seed=0, n_source=(6, 0), n_target=(6, 0), size=64, progress=False)

    def stats(domain):
        imgs = [s.image for s in data.stream_domain(root, domain, 64)]
        # after the loader's min-max: channel means and spread, averaged over images
        return np.mean([np.r_[x.mean((1, 2)), x.std((1, 2))] for x in imgs], axis=0)

    src = stats(synth.SOURCE_DOMAIN)
    for t in synth.TARGET_DOMAINS:
        assert (np.abs(stats(t) - src) / src).max() > 0.2, t


def test_generation_writes_every_image_and_renders_the_default_size(bench):
    # how long generation takes is measured by the benchmarks, not asserted here
    _, summary, _ = bench
    assert summary["images"] == N_IMAGES
    image, mask = synth.render(synth._rng(0, synth.SOURCE_DOMAIN, "train", 0),
                               synth.SOURCE_DOMAIN, 320)
    assert image.shape == (320, 320, 3) and image.dtype == np.uint8 and mask.shape == (320, 320)


def test_bad_arguments_are_user_errors(tmp_path):
    from grata.errors import GrataError
    with pytest.raises(GrataError, match="size"):
        synth.generate(tmp_path / "x", size=8, progress=False)
    with pytest.raises(GrataError, match="counts"):
        synth.generate(tmp_path / "x", n_source=(-1, 2), progress=False)

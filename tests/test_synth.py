"""The synthetic benchmark: deterministic, readable by grata.domains, well-formed masks,
measurably shifted target domains, version-3 domains unchanged."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from grata import domains, synth

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
    assert synth.TARGET_DOMAINS == synth.CAMERA_DOMAINS + synth.CONTENT_DOMAINS
    assert len(synth.CONTENT_DOMAINS) >= 3
    assert len(synth.TARGET_DOMAINS) >= 4 and len(set(synth.TARGET_DOMAINS)) == len(
        synth.TARGET_DOMAINS)
    for name in (synth.SOURCE_DOMAIN, *synth.TARGET_DOMAINS):
        assert name in synth.__doc__
        assert synth.DOMAINS[name].shift


# SHA-256 (first 16 hex digits) of the rendered arrays (image bytes + mask bytes) of the
# version-3 generator, recorded before version 4 added the content domains.
V3_RENDERS = {
    ("Clinic", 0, "train", 0, 96): "b53195b052a15267",
    ("Clinic", 3, "test", 1, 64): "92f5740212b0813e",
    ("Clinic", 0, "test", 11, 128): "c5d5aa86297df9c3",
    ("Handheld", 0, "train", 0, 96): "d4916ace976e1f9f",
    ("Handheld", 3, "test", 1, 64): "bb01b7a34b14a170",
    ("Widefield", 0, "train", 0, 96): "371533176175ab24",
    ("Widefield", 3, "test", 1, 64): "53861bd59dbe8ca8",
    ("LowLight", 0, "train", 0, 96): "9a38c1ec67014885",
    ("LowLight", 3, "test", 1, 64): "884647d7a817a557",
    ("Legacy", 0, "train", 0, 96): "7d986b4803e1cd1e",
    ("Legacy", 3, "test", 1, 64): "54f0cd6e2579d54e",
    ("Legacy", 0, "test", 11, 128): "e9d1ac4a84837224",
}


@pytest.mark.parametrize("key", sorted(V3_RENDERS), ids=lambda k: "-".join(map(str, k)))
def test_version_3_domains_render_the_same_pixels(key):
    domain, seed, split, index, size = key
    image, mask = synth.render(synth._rng(seed, domain, split, index), domain, size)
    digest = hashlib.sha256(image.tobytes() + mask.tobytes()).hexdigest()[:16]
    assert digest == V3_RENDERS[key]


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
    assert domains.list_domains(root) == sorted([synth.SOURCE_DOMAIN, *synth.TARGET_DOMAINS])
    for domain in (synth.SOURCE_DOMAIN, *synth.TARGET_DOMAINS):
        entries, problems = domains.domain_entries(root, domain)
        n = (3, 2) if domain == synth.SOURCE_DOMAIN else (2, 1)
        assert problems == [] and len(entries) == sum(n)
        assert ["/train/" in e.name for e in entries] == [True] * n[0] + [False] * n[1]
        samples = list(domains.stream_domain(root, domain, 32))
        assert all(isinstance(s, domains.Sample) for s in samples)
    assert any(p.suffix == ".jpg" for p in root.rglob("*/image/*"))


def test_masks_follow_the_encoding(bench):
    root, _, _ = bench
    masks = sorted(root.rglob("*/mask/*.png"))
    assert len(masks) == N_IMAGES
    for p in masks:
        d = synth.DOMAINS[p.parent.parent.parent.name]
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
        assert 0.6 * d.cdr[0] < vcdr < 0.95
        # vertical extent: the domain's disc range, give or take the outline's wobble,
        # rotation (oval discs) and a pixel at each end
        height = (np.ptp(rows) + 1) / 96
        assert 0.85 * d.disc[0] * d.aspect[0] - 2 / 96 < height < 1.1 * d.disc[1] + 2 / 96
        img = Image.open(str(p).replace("/mask/", "/image/").replace(
            ".png", ".jpg" if "Legacy" in p.name else ".png"))
        assert img.size == im.size and img.mode == "RGB"


def test_camera_targets_differ_in_colour_from_source(tmp_path):
    root = tmp_path / "colour"
    synth.generate(root, seed=0, n_source=(6, 0), n_target=(6, 0), size=64, progress=False)

    def stats(domain):
        imgs = [s.image for s in domains.stream_domain(root, domain, 64)]
        # after the loader's min-max: channel means and spread, averaged over images
        return np.mean([np.r_[x.mean((1, 2)), x.std((1, 2))] for x in imgs], axis=0)

    src = stats(synth.SOURCE_DOMAIN)
    for t in synth.CAMERA_DOMAINS:
        assert (np.abs(stats(t) - src) / src).max() > 0.2, t


def _geometry(domain, n=12, size=96):
    """Per image: disc centre's distance from the crop centre and vertical extent (both
    fractions of the crop), disc minor/major axis ratio (second moments), vCDR, share of
    black pixels, whether any black pixel lies on the disc, whether the disc touches the
    crop's edge. Measured from the rendered masks and images."""
    out = []
    for i in range(n):
        image, mask = synth.render(synth._rng(0, domain, "test", i), domain, size)
        disc, cup = mask < 255, mask == 0
        ys, xs = np.nonzero(disc)
        centre = np.hypot(xs.mean() + 0.5 - size / 2, ys.mean() + 0.5 - size / 2) / size
        minor, major = np.sqrt(np.linalg.eigvalsh(np.cov(np.stack([xs, ys]))))
        black = image.max(axis=2) < 20
        edge = disc[0].any() or disc[-1].any() or disc[:, 0].any() or disc[:, -1].any()
        out.append({"centre": centre, "height": (np.ptp(ys) + 1) / size,
                    "ratio": minor / major,
                    "vcdr": (np.ptp(np.flatnonzero(cup.any(1))) + 1) / (np.ptp(ys) + 1),
                    "black": black.mean(), "black_on_disc": bool((black & disc).any()),
                    "edge": edge})
    return {k: np.array([g[k] for g in out]) for k in out[0]}


@pytest.fixture(scope="module")
def geometry():
    return {d: _geometry(d) for d in (synth.SOURCE_DOMAIN, *synth.CONTENT_DOMAINS)}


def test_content_domains_keep_the_source_camera():
    fields = ("gains", "exposure", "gamma", "contrast", "black", "vignette", "gradient",
              "blur", "noise", "blue_keep", "haze", "jpeg")
    src = synth.DOMAINS[synth.SOURCE_DOMAIN]
    for t in synth.CONTENT_DOMAINS:
        assert all(getattr(synth.DOMAINS[t], f) == getattr(src, f) for f in fields), t


def test_source_discs_are_centred_and_clean(geometry):
    g = geometry[synth.SOURCE_DOMAIN]
    assert g["centre"].max() < 0.145 and not g["edge"].any()
    assert ((0.26 < g["height"]) & (g["height"] < 0.45)).all()
    assert g["black"].max() == 0 and np.median(g["ratio"]) > 0.85
    assert g["vcdr"].min() > 0.25


def test_off_centre_discs_lie_away_from_the_centre_inside_the_crop(geometry):
    g = geometry["OffCentre"]
    assert g["centre"].min() > 0.14 and g["centre"].max() < 0.32
    assert g["centre"].min() > geometry[synth.SOURCE_DOMAIN]["centre"].max()
    assert not g["edge"].any()


def test_crops_at_other_scales_change_the_disc_size(geometry):
    wide, tight = geometry["WideCrop"]["height"], geometry["TightCrop"]["height"]
    assert ((0.11 < wide) & (wide < 0.23)).all()
    assert ((0.46 < tight) & (tight < 0.72)).all()
    assert not geometry["TightCrop"]["edge"].any()


def test_border_fov_blackens_part_of_every_crop_but_never_the_disc(geometry):
    g = geometry["BorderFOV"]
    assert ((0.05 < g["black"]) & (g["black"] < 0.6)).all()
    assert not g["black_on_disc"].any()


def test_atypical_discs_are_oval_with_small_cups(geometry):
    g = geometry["Atypical"]
    assert g["ratio"].max() < 0.87 and np.median(g["ratio"]) < 0.8
    assert g["vcdr"].max() < 0.4


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


def _scale_geometry(domain, n=30, size=160):
    """Per image of a stream (file order: the train split's positions): the disc's
    vertical diameter over the source's typical one, its centre's distance from the crop
    centre (fraction of the side), the share of black pixels, whether the crop's edge
    cuts the disc. Measured from the rendered masks and images."""
    from grata.disc_scale import disc_geometry
    out = []
    for i in range(n):
        image, mask = synth.render(synth._rng(0, domain, "train", i), domain, size,
                                   stream_index=synth.stream_index("train", i))
        disc = mask < 255
        cx, cy, d = disc_geometry(disc)
        out.append({"scale": d / size / synth.SOURCE_DISC,
                    "offset": np.hypot(cx - size / 2, cy - size / 2) / size,
                    "black": (image.max(axis=2) < 20).mean(),
                    "cut": bool(disc[0].any() or disc[-1].any() or disc[:, 0].any()
                                or disc[:, -1].any())})
    return {k: np.array([g[k] for g in out]) for k in out[0]}


def test_source_disc_is_the_source_domains_typical_diameter():
    assert synth.SOURCE_DISC == pytest.approx(np.mean(synth.DOMAINS[synth.SOURCE_DOMAIN].disc))
    g = _scale_geometry(synth.SOURCE_DOMAIN, n=40)
    assert abs(np.median(g["scale"]) - 1) < 0.08, np.median(g["scale"])


@pytest.mark.parametrize("domain,low,high", [("FarCrop", 0.35, 0.55), ("MidCrop", 0.55, 0.85)])
def test_wider_crops_show_a_smaller_disc_anywhere_in_the_middle_two_thirds(domain, low, high):
    g = _scale_geometry(domain)
    tol = 2 / 160 / synth.SOURCE_DISC  # a pixel at each end
    assert ((low - tol < g["scale"]) & (g["scale"] < high + tol)).all(), g["scale"]
    assert g["scale"].max() - g["scale"].min() > 0.5 * (high - low)  # the range is used
    assert g["offset"].max() < 1 / 3 + 0.01 and g["offset"].max() > 0.2
    assert not g["cut"].any()
    fov = g["black"] > 0.02  # the field of view's edge in some crops, never in all
    assert 0.15 < fov.mean() < 0.75, fov.mean()


def test_scale_drift_moves_slowly_from_large_to_small_along_the_stream():
    g = _scale_geometry("ScaleDrift")
    s = g["scale"]
    assert 1.1 < s[0] < 1.3 + 0.02 and 0.35 - 0.02 < s[-1] < 0.45
    assert ((0.35 - 0.02 < s) & (s < 1.3 + 0.02)).all()
    step = np.diff(np.log(s))
    assert np.corrcoef(np.arange(len(s)), np.log(s))[0, 1] < -0.95
    assert np.abs(step).max() < 0.25  # slowly: no jump between neighbours
    assert g["offset"].max() < 0.2 + 0.01 and not g["cut"].any()
    # the position does not depend on the counts: the test split continues the train's
    assert synth.stream_index("test", 0) == synth.DRIFT_TRAIN == synth.stream_index("train", 18)
    assert synth.drift_diameter((1.0, 0.5), synth.DRIFT_LENGTH) == 0.5
    assert synth.drift_diameter((1.0, 0.5), 2 * synth.DRIFT_LENGTH) == 1.0  # and back


def test_scale_domains_cover_the_promised_range():
    lo = min(synth.DOMAINS[d].disc[0] for d in synth.SCALE_DOMAINS) / synth.SOURCE_DISC
    hi = max(synth.DOMAINS[d].disc[1] for d in synth.SCALE_DOMAINS) / synth.SOURCE_DISC
    assert (round(lo, 6), round(hi, 6)) == (0.35, 1.3)
    assert set(synth.SCALE_DOMAINS) <= set(synth.CONTENT_DOMAINS)

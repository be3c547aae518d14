"""Optic disc localisation on whole photographs, the ROI rule, crop and paste-back."""

import numpy as np
import pytest
from scipy import ndimage

from grata import roi, synth, synth_whole
from grata.errors import GrataError

WIDTH = 768  # smaller than the generator's default, for speed; the search runs at WORK_D
PER_DOMAIN = 8


def _render(seed, domain, i, **kw):
    return synth_whole.render_whole(synth_whole._rng(seed, domain, "test", i), domain, WIDTH,
                                    **kw)


def _plain_brightest_blob(image):
    """The baseline: the brightest disc-sized blob of the grey image (no FOV, no
    illumination model, no vessels)."""
    g = image.astype(np.float32).mean(axis=2)
    s = ndimage.gaussian_filter(g, 0.03 * max(image.shape[:2]))
    y, x = np.unravel_index(int(np.argmax(s)), s.shape)
    return x + 0.5, y + 0.5


def _err_dd(cx, cy, truth):
    return float(np.hypot(cx - truth["cx"], cy - truth["cy"]) / (2 * truth["ry"]))


def _inside_disc(cx, cy, mask):
    x, y = int(np.floor(cx)), int(np.floor(cy))
    return 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] < 255


def _disc_in_box(mask, box):
    ys, xs = np.nonzero(mask < 255)
    x0, y0, x1, y1 = box
    return xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1


@pytest.fixture(scope="module")
def located():
    rows = []
    for domain in (synth.SOURCE_DOMAIN, *synth_whole.TARGET_DOMAINS):
        for i in range(PER_DOMAIN):
            image, mask, truth = _render(11, domain, i)
            rows.append((domain, image, mask, truth, roi.locate_disc(image)))
    return rows


# ----------------------------------------------------------------------------- accuracy

def test_centre_error_and_containment(located):
    errs = {}
    inside = contained = accepted = 0
    for domain, image, mask, truth, d in located:
        errs.setdefault(domain, []).append(_err_dd(d["cx"], d["cy"], truth))
        inside += _inside_disc(d["cx"], d["cy"], mask)
        contained += _disc_in_box(mask, roi.roi_box(image.shape, d, d["fov"]))
        accepted += d["score"] >= roi.SCORE_THRESHOLD
    n = len(located)
    for domain, e in errs.items():  # measured: medians 0.01-0.06 DD
        assert np.median(e) <= 0.1, (domain, np.round(e, 3))
    assert np.median(sum(errs.values(), [])) <= 0.05
    assert inside / n >= 0.97 and contained / n >= 0.97 and accepted / n >= 0.95, (
        inside, contained, accepted, n)


def test_radius_and_fov_estimates(located):
    ratios = [d["r"] / t["r"] for _, _, _, t, d in located]
    assert 0.85 <= np.median(ratios) <= 1.15
    assert np.percentile(ratios, 10) >= 0.6 and np.percentile(ratios, 90) <= 1.5
    for _, _, _, t, d in located:  # the FOV diameter sets the crop's scale
        assert d["fov"]["d"] == pytest.approx(t["fov"]["d"], rel=0.04)


def test_left_and_right_eyes(located):
    eyes = {"left": [], "right": []}
    for _, _, _, t, d in located:
        eyes[t["eye"]].append(_err_dd(d["cx"], d["cy"], t))
    assert len(eyes["left"]) >= 8 and len(eyes["right"]) >= 8
    assert max(np.median(v) for v in eyes.values()) <= 0.1
    # The mirror image is the other eye: the answer mirrors too.
    _, image, _, t, d = located[0]
    m = roi.locate_disc(np.ascontiguousarray(image[:, ::-1]))
    assert abs(m["cx"] - (image.shape[1] - d["cx"])) <= 0.1 * 2 * t["ry"]
    assert abs(m["cy"] - d["cy"]) <= 0.1 * 2 * t["ry"]


def test_coordinates_follow_the_resolution():
    """Same photograph at twice the size: the answer scales (no resolution bias)."""
    image, _, t = _render(12, synth.SOURCE_DOMAIN, 0)
    big = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)
    a, b = roi.locate_disc(image), roi.locate_disc(big)
    for k in ("cx", "cy", "r"):
        assert b[k] == pytest.approx(2 * a[k], abs=0.05 * 2 * t["ry"] * 2), k
    assert b["fov"]["d"] == pytest.approx(2 * a["fov"]["d"], rel=0.02)


# ----------------------------------------------------------------------------- hostile

def test_bright_rim_artefact_beats_the_plain_finder():
    """A reflection near the FOV rim, brighter than the disc: the plain brightest-blob
    finder lands on it, locate_disc does not."""
    plain_wrong = 0
    for i in range(4):
        image, mask, t = _render(21, "Clinic", i, artefact=1.5, uneven=0.0)
        px, py = _plain_brightest_blob(image)
        plain_wrong += not _inside_disc(px, py, mask)
        d = roi.locate_disc(image)
        assert _inside_disc(d["cx"], d["cy"], mask) and _err_dd(d["cx"], d["cy"], t) <= 0.15
        assert d["score"] >= roi.SCORE_THRESHOLD
    assert plain_wrong == 4  # the premise: the artefact is the brightest blob


def test_uneven_illumination_beats_the_plain_finder():
    plain_wrong = 0
    for i in range(6):
        image, mask, t = _render(22, "Clinic", i, artefact=0.0, uneven=0.9)
        px, py = _plain_brightest_blob(image)
        plain_wrong += not _inside_disc(px, py, mask)
        d = roi.locate_disc(image)
        assert _inside_disc(d["cx"], d["cy"], mask) and _err_dd(d["cx"], d["cy"], t) <= 0.15
    assert plain_wrong >= 2  # the premise: the lit side outshines the disc


# ----------------------------------------------------------------------------- rejection

def _no_disc_images():
    rng = np.random.default_rng(0)
    h, w = 600, 800
    yy, xx = np.mgrid[0:h, 0:w]
    grey = np.zeros((h, w, 3), np.uint8)
    grey[(xx - 400) ** 2 + (yy - 300) ** 2 < 280 ** 2] = (150, 90, 50)
    smooth = ndimage.gaussian_filter(rng.normal(0, 1, (h, w)), 6)
    smooth = np.clip(128 + 60 * smooth / smooth.std(), 0, 255).astype(np.uint8)
    return {
        "all black": np.zeros((h, w, 3), np.uint8),
        "random texture": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "smooth random texture": np.repeat(smooth[..., None], 3, axis=2),
        "uniform grey disc": grey,
    }


@pytest.mark.parametrize("name", list(_no_disc_images()))
def test_no_disc_is_rejected(name):
    image = _no_disc_images()[name]
    d = roi.locate_disc(image)
    assert d["score"] < roi.SCORE_THRESHOLD and d["reason"]
    with pytest.raises(roi.RoiRejected) as e:
        roi.prepare(image)
    assert isinstance(e.value, GrataError) and e.value.reason and e.value.info is not None


def _dimmed(image, mask, keep):
    """The disc's contrast to its surround scaled by ``keep`` (0: painted over)."""
    near = ndimage.binary_dilation(mask < 255, iterations=3)
    ring = ndimage.binary_dilation(mask < 255, iterations=25) & ~ndimage.binary_dilation(
        mask < 255, iterations=8)
    bg = np.median(image[ring], axis=0)
    a = ndimage.gaussian_filter(near.astype(np.float32), 3)[..., None]
    return np.clip(image * (1 - a) + (bg + keep * (image - bg)) * a, 0, 255).astype(np.uint8)


def test_dim_disc_is_still_found():
    accepted = 0
    for domain in ("Clinic", "Handheld"):
        for i in range(3):
            image, mask, t = _render(7, domain, i)
            d = roi.locate_disc(_dimmed(image, mask, 0.4))
            assert _inside_disc(d["cx"], d["cy"], mask), (domain, i, d)
            accepted += d["score"] >= roi.SCORE_THRESHOLD
    assert accepted >= 5


def test_fundus_without_a_disc_is_rejected():
    """A retina with vessels but the disc painted over (a photograph of the macula whose
    disc is out of the field): rejected; a bright blob alone (a grey photograph with one
    bright spot) is not a disc either."""
    for i in range(3):
        image, mask, _ = _render(13, "Clinic", i)
        disc = ndimage.binary_dilation(mask < 255, iterations=12)
        flat = image.copy()
        flat[disc] = np.median(image[ndimage.binary_dilation(disc, iterations=20) & ~disc],
                               axis=0)
        assert roi.locate_disc(flat)["score"] < roi.SCORE_THRESHOLD, i
    h, w = 600, 800
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.zeros((h, w, 3), np.uint8)
    blob[(xx - 400) ** 2 + (yy - 300) ** 2 < 280 ** 2] = (150, 90, 50)
    blob[(xx - 520) ** 2 + (yy - 300) ** 2 < 40 ** 2] = (250, 200, 150)
    assert roi.locate_disc(blob)["score"] < roi.SCORE_THRESHOLD


def test_bad_input_is_a_user_error():
    for bad in (np.zeros((64, 64), np.uint8), np.zeros((64, 64, 3), np.float32),
                np.zeros((64, 64, 4), np.uint8)):
        with pytest.raises(GrataError):
            roi.locate_disc(bad)


# ----------------------------------------------------------------------------- ROI rule

def test_roi_box_rule():
    # GraTa/DoFE: 800 px crops from photographs whose FOV spans 2124 px
    box = roi.roi_box((2056, 2124, 3), {"cx": 1500.0, "cy": 1000.0}, {"d": 2124.0})
    assert box == (1100, 600, 1900, 1400)
    x0, y0, x1, y1 = roi.roi_box((800, 1024, 3), {"cx": 10.3, "cy": 790.7}, {"d": 800.0})
    side = round(800 * 800 / 2124)
    assert x1 - x0 == side == y1 - y0
    assert abs((x0 + x1) / 2 - 10.3) <= 0.5 and abs((y0 + y1) / 2 - 790.7) <= 0.5
    assert x0 < 0 and y1 > 800  # the box may leave the photograph


def _reference_crop(a, box, fill):
    x0, y0, x1, y1 = box
    out = np.full((y1 - y0, x1 - x0) + a.shape[2:], fill, a.dtype)
    for y in range(y0, y1):
        for x in range(x0, x1):
            if 0 <= y < a.shape[0] and 0 <= x < a.shape[1]:
                out[y - y0, x - x0] = a[y, x]
    return out


BOXES = [(10, 5, 40, 35), (-12, -7, 18, 23), (50, 30, 90, 70), (-20, -20, 100, 100),
         (65, 45, 75, 55), (100, 100, 120, 120)]


@pytest.mark.parametrize("box", BOXES)
def test_crop_and_paste_back_are_exact(box):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    mask = rng.choice(np.array([0, 128, 255], np.uint8), size=(60, 80))
    c = roi.crop(image, box)
    assert c.shape == (box[3] - box[1], box[2] - box[0], 3)
    np.testing.assert_array_equal(c, _reference_crop(image, box, 0))
    mc = roi.crop(mask, box, fill=255)
    np.testing.assert_array_equal(mc, _reference_crop(mask, box, 255))
    full = roi.paste(mc, box, mask.shape)
    # crop -> mask -> paste: the crop's mask at its place, background everywhere else
    x0, y0, x1, y1 = box
    expect = np.full(mask.shape, 255, np.uint8)
    ys, xs = slice(max(y0, 0), min(y1, 60)), slice(max(x0, 0), min(x1, 80))
    expect[ys, xs] = mask[ys, xs]
    np.testing.assert_array_equal(full, expect)


def test_paste_resizes_by_nearest_neighbour():
    rng = np.random.default_rng(2)
    small = rng.choice(np.array([0, 128, 255], np.uint8), size=(16, 16))
    box = (-8, 20, 40, 68)  # side 48 = 3 x 16: each crop pixel becomes a 3 x 3 block
    full = roi.paste(small, box, (50, 60), background=255)
    big = np.kron(small, np.ones((3, 3), np.uint8))
    expect = np.full((50, 60), 255, np.uint8)
    expect[20:50, 0:40] = big[0:30, 8:48]
    np.testing.assert_array_equal(full, expect)
    assert set(np.unique(roi.paste(small, (0, 0, 37, 37), (40, 40)))) <= {0, 128, 255}


def test_prepare_crops_around_the_disc():
    image, mask, t = _render(14, "Handheld", 1)
    crop, box, info = roi.prepare(image)
    side = round(roi.ROI_FRACTION * info["fov"]["d"])
    assert crop.shape == (side, side, 3) and box[2] - box[0] == side
    np.testing.assert_array_equal(crop, _reference_crop(image, box, 0))
    assert _disc_in_box(mask, box)
    # the disc of a crop at the true disc fills the domain's share of the ROI
    dmask = roi.crop(mask, box, fill=255) < 255
    rows = np.flatnonzero(dmask.any(axis=1))
    lo, hi = synth.DOMAINS["Handheld"].disc
    assert lo - 0.03 <= (rows[-1] - rows[0] + 1) / side <= hi + 0.03
    with pytest.raises(GrataError):
        roi.crop(image, (5, 5, 5, 10))


def test_record_is_json_safe():
    import json

    image, _, _ = _render(14, "Clinic", 0)
    crop, box, info = roi.prepare(image)
    rec = json.loads(json.dumps(roi.record(info, box), allow_nan=False))
    assert rec["box"] == list(box) and rec["score"] == pytest.approx(info["score"], abs=1e-4)
    assert rec["cx"] == pytest.approx(info["cx"], abs=0.01)
    black = roi.locate_disc(np.zeros((64, 64, 3), np.uint8))
    rec = json.loads(json.dumps(roi.record(black), allow_nan=False))
    assert rec["cx"] is None and rec["fov"] is None and rec["score"] == 0 and rec["reason"]


def test_field_of_view_cut_on_all_sides():
    """A photograph framed inside its field of view (cut left, right, top and bottom):
    the FOV diameter comes from the circle through the free edge, not the frame."""
    image, mask, t = _render(3, "Clinic", 0)
    f = t["fov"]
    c, half = int(f["cx"]), int(0.40 * f["d"])
    cut = np.ascontiguousarray(image[:, c - half:c + half])
    assert cut.shape[1] < 0.85 * f["d"]
    d = roi.locate_disc(cut)
    assert d["fov"]["d"] == pytest.approx(f["d"], rel=0.03)
    assert _err_dd(d["cx"] + (c - half), d["cy"], t) <= 0.1

"""Metrics against hand-derived values and independent brute-force references."""

import json
import math

import numpy as np
import pytest

from grata import metrics as M


# ---------------------------------------------------------------- independent references
def dice_by_sets(p, g):
    """Dice from sets of foreground coordinates: shares no code path with the module."""
    ps = {tuple(i) for i in np.argwhere(p)}
    gs = {tuple(i) for i in np.argwhere(g)}
    return (2 * len(ps & gs) + 1e-6) / (len(ps) + len(gs) + 1e-6) * 100


def surface_by_neighbours(m):
    """Foreground pixels with a 4-neighbour outside the mask (outside the image counts)."""
    padded = np.pad(m, 1, constant_values=False)
    out = []
    for r, c in np.argwhere(m):
        r1, c1 = r + 1, c + 1
        if not (padded[r1 - 1, c1] and padded[r1 + 1, c1]
                and padded[r1, c1 - 1] and padded[r1, c1 + 1]):
            out.append((r, c))
    return np.array(out, dtype=np.float64)


def asd_brute(p, g, spacing=(1.0, 1.0)):
    sp, sg = surface_by_neighbours(p), surface_by_neighbours(g)
    if len(sp) == 0 or len(sg) == 0:
        return 100.0
    d = (sp[:, None, :] - sg[None, :, :]) * np.asarray(spacing)
    return float(np.sqrt((d ** 2).sum(-1)).min(axis=1).mean())


def random_blob(rng, shape=(24, 24), n=3):
    """A few random ellipses, possibly touching the image edge."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    m = np.zeros(shape, bool)
    for _ in range(n):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        ry, rx = rng.uniform(1, 7), rng.uniform(1, 7)
        m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return m


def ellipse(shape, cy, cx, ry, rx):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


# ---------------------------------------------------------------- binarize / logits
def test_binarize_threshold_is_inclusive_and_bool_passes():
    a = np.array([0.0, 0.4999, 0.5, 0.9, np.nan], np.float32)
    assert M.binarize(a).tolist() == [False, False, True, True, False]
    b = np.array([True, False])
    assert M.binarize(b) is b
    assert M.binarize(np.array([0, 1, 255], np.uint8)).tolist() == [False, True, True]


def test_binarize_logits_decides_on_the_sign_in_float32():
    # sigmoid(-1e-9) rounds to 0.5 in float32; the sign of the logit does not
    z = np.array([-1e-9, -0.0, 0.0, 1e-9, -3.0, 3.0, np.nan])
    assert M.binarize(z, logits=True).tolist() == [False, True, True, True, False, True, False]
    # float64 values too small for float32 take float32's sign: -1e-50 becomes -0.0
    assert M.binarize(np.array([-1e-50, 1e-50]), logits=True).tolist() == [True, True]
    assert M.binarize(np.array([-2.0, 0.5, 2.0]), logits=True).tolist() == [False, True, True]


def test_probs_from_logits_stable_and_correct():
    x = np.array([-1000.0, -20.0, -1.5, 0.0, 2.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        p = M.probs_from_logits(x)
    np.testing.assert_allclose(p[1:5], 1 / (1 + np.exp(-x[1:5])), rtol=1e-12)
    assert p[0] == 0.0 and p[-1] == 1.0 and p[3] == 0.5
    assert M.probs_from_logits(x.astype(np.float32)).dtype == np.float32
    assert M.probs_from_logits(np.array([3])).dtype == np.float64


# ---------------------------------------------------------------- Dice
def test_dice_matches_set_reference_on_random_masks():
    rng = np.random.default_rng(0)
    for density in (0.05, 0.3, 0.7):
        for _ in range(5):
            p = rng.random((17, 23)) < density
            g = rng.random((17, 23)) < density
            assert M.dice(p, g) == pytest.approx(dice_by_sets(p, g), rel=1e-12)


def test_dice_ratio_is_dice_over_100_and_matches_the_set_reference():
    rng = np.random.default_rng(1)
    for density in (0.05, 0.5):
        p = rng.random((13, 11)) < density
        g = rng.random((13, 11)) < density
        assert M.dice_ratio(p, g) == pytest.approx(dice_by_sets(p, g) / 100, rel=1e-12)
        assert M.dice(p, g) == M.dice_ratio(p, g) * 100.0
    z = np.zeros((4, 4), bool)
    assert M.dice_ratio(z, z) == 1.0
    one, two = z.copy(), z.copy()
    one[0, 0] = True
    two[0, :2] = True
    assert M.dice_ratio(one, two) == pytest.approx((2 + 1e-6) / (3 + 1e-6), rel=1e-15)


def test_dice_hand_values():
    z = np.zeros((8, 8), bool)
    a = z.copy()
    a[2:5, 2:6] = True
    b = z.copy()
    b[6:, 6:] = True
    assert M.dice(a, a) == pytest.approx(100.0, abs=1e-9)
    assert M.dice(a, b) == pytest.approx(1e-6 / (12 + 4 + 1e-6) * 100, rel=1e-12)  # ~0
    assert M.dice(z, z) == 100.0  # both empty: the smoothing term makes it 1e-6/1e-6
    one, two = z.copy(), z.copy()
    one[0, 0] = True
    two[0, :2] = True
    # (2*1 + 1e-6) / (1 + 2 + 1e-6) * 100 = 66.6666889..., not exactly 200/3
    assert M.dice(one, two) == pytest.approx((2 + 1e-6) / (3 + 1e-6) * 100, rel=1e-12)
    assert M.dice(one, two) == pytest.approx(200 / 3, rel=1e-6)


def test_dice_thresholds_probabilities():
    g = np.array([[1.0, 1.0, 0.0, 0.0]])
    p = np.array([[0.5, 0.49, 0.2, 0.7]])  # binarized: 1 0 0 1 -> inter 1, |P| 2, |G| 2
    assert M.dice(p, g) == pytest.approx((2 + 1e-6) / (4 + 1e-6) * 100, rel=1e-12)


def test_dice_shape_mismatch_raises():
    with pytest.raises(ValueError):
        M.dice(np.zeros((3, 3)), np.zeros((3, 4)))


# ---------------------------------------------------------------- surface distance
def test_surface_distance_hand_values():
    z = np.zeros((12, 12), bool)
    a = z.copy()
    a[3:6, 3:6] = True
    b = z.copy()
    b[3:6, 4:7] = True
    # 3x3 ring of a vs ring of b (shifted one column): distances 1,0,0 / 1,_,1 / 1,0,0 -> 4/8
    assert M.surface_distance(a, b) == pytest.approx(0.5)
    assert M.surface_distance(a, a) == 0.0

    p, g = z.copy(), z.copy()
    p[1, 1] = True
    g[4, 5] = True
    assert M.surface_distance(p, g) == pytest.approx(5.0)
    assert M.surface_distance(p, g, spacing=(2.0, 1.0)) == pytest.approx(math.sqrt(52))


def test_surface_distance_is_one_sided_pred_to_gt():
    z = np.zeros((11, 11), bool)
    dot, square = z.copy(), z.copy()
    dot[5, 5] = True
    square[3:8, 3:8] = True
    assert M.surface_distance(dot, square) == pytest.approx(2.0)
    # 16 ring pixels to the centre: 4 corners sqrt(8), 4 edge middles 2, 8 others sqrt(5)
    expected = (4 * math.sqrt(8) + 4 * 2 + 8 * math.sqrt(5)) / 16
    assert M.surface_distance(square, dot) == pytest.approx(expected)


def test_surface_distance_empty_is_100():
    z = np.zeros((6, 6), bool)
    a = z.copy()
    a[2, 2] = True
    assert M.surface_distance(z, a) == 100.0
    assert M.surface_distance(a, z) == 100.0
    assert M.surface_distance(z, z) == 100.0


def test_surface_distance_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(1)
    for _ in range(12):
        p, g = random_blob(rng), random_blob(rng)
        assert M.surface_distance(p, g) == pytest.approx(asd_brute(p, g), rel=1e-12)
    p, g = random_blob(rng), random_blob(rng)
    assert M.surface_distance(p, g, spacing=(0.5, 2.0)) == pytest.approx(
        asd_brute(p, g, (0.5, 2.0)), rel=1e-12)


def test_surface_distance_image_edge_is_surface():
    # A mask filling the image: medpy erodes with background outside, so its surface is the
    # image border and the centre pixel is 2 away from it.
    full = np.ones((5, 5), bool)
    dot = np.zeros((5, 5), bool)
    dot[2, 2] = True
    assert M.surface_distance(dot, full) == pytest.approx(2.0)
    assert M.surface_distance(full, full) == 0.0


# ---------------------------------------------------------------- vCDR
def disc_and_cup(shape=(64, 64)):
    disc = np.zeros(shape, bool)
    disc[10:50, 12:52] = True  # 40 rows
    cup = np.zeros(shape, bool)
    cup[20:40, 22:42] = True  # 20 rows
    return np.stack([disc, cup])


def test_vertical_cdr_hand_values():
    m = disc_and_cup()
    assert M.vertical_cdr(m) == pytest.approx(0.5)
    # Ellipses: disc 41 rows tall at its centre column, cup 21 -> 21/41
    e = np.stack([ellipse((64, 64), 30, 30, 20, 15), ellipse((64, 64), 30, 30, 10, 6)])
    assert M.vertical_diameter(e[0]) == 41 and M.vertical_diameter(e[1]) == 21
    assert M.vertical_cdr(e) == pytest.approx(21 / 41)
    assert M.vertical_cdr(e.astype(np.float32) * 0.9) == pytest.approx(21 / 41)


def test_vertical_cdr_ignores_stray_speck_and_empty_disc_is_nan():
    m = disc_and_cup()
    m[0, 62, 62] = True  # a speck far below the disc must not stretch its diameter
    assert M.vertical_cdr(m) == pytest.approx(0.5)
    m[0] = False
    assert math.isnan(M.vertical_cdr(m))
    assert math.isnan(M.vertical_cdr(np.zeros((2, 0, 0), bool)))


def test_vcdr_error_conventions():
    gt = disc_and_cup()
    pred = gt.copy()
    pred[1, 20:25] = False  # cup 15 rows -> 0.375
    assert M.vcdr_error(pred, gt) == pytest.approx(0.125)
    assert M.vcdr_error(gt, pred) == pytest.approx(0.125)
    no_disc = gt.copy()
    no_disc[0] = False
    assert math.isnan(M.vcdr_error(pred, no_disc))  # target without a disc: undefined
    assert M.vcdr_error(no_disc, gt) == pytest.approx(0.5)  # missed disc: pred vCDR is 0


# ---------------------------------------------------------------- image_metrics / aggregate
def test_image_metrics_keys_types_and_values():
    gt = disc_and_cup()
    probs = gt.astype(np.float32) * 0.8 + 0.1  # 0.9 / 0.1: same masks after threshold
    r = M.image_metrics(probs, gt)
    assert tuple(r) == M.IMAGE_KEYS
    assert all(type(v) is float for v in r.values())
    assert r["dice_od"] == pytest.approx(100) and r["dice_oc"] == pytest.approx(100)
    assert r["asd_od"] == 0.0 and r["vcdr_error"] == 0.0
    json.dumps(r)

    pred = gt.copy()
    pred[1] = False  # no cup predicted
    r = M.image_metrics(pred, gt)
    assert r["dice_oc"] == pytest.approx(0, abs=1e-6)
    assert r["dice_mean"] == pytest.approx((r["dice_od"] + r["dice_oc"]) / 2)
    assert r["asd_oc"] == 100.0
    assert r["vcdr_pred"] == 0.0 and r["vcdr_error"] == pytest.approx(0.5)

    with pytest.raises(ValueError):
        M.image_metrics(gt[0], gt[0])


def test_aggregate_hand_rows():
    rows = [
        {"dice_od": 90.0, "dice_oc": 70.0, "dice_mean": 80.0, "asd_od": 2.0, "asd_oc": 4.0,
         "vcdr_pred": 0.5, "vcdr_gt": 0.6, "vcdr_error": 0.1},
        {"dice_od": 80.0, "dice_oc": 50.0, "dice_mean": 65.0, "asd_od": 4.0, "asd_oc": 100.0,
         "vcdr_pred": 0.7, "vcdr_gt": 0.4, "vcdr_error": 0.3},
        {"dice_od": 100.0, "dice_oc": 100.0, "dice_mean": 100.0, "asd_od": 100.0, "asd_oc": 100.0,
         "vcdr_pred": math.nan, "vcdr_gt": math.nan, "vcdr_error": math.nan},
        {"dice_od": 70.0, "dice_oc": 40.0, "dice_mean": 55.0, "asd_od": 6.0, "asd_oc": 8.0,
         "vcdr_pred": None, "vcdr_gt": None, "vcdr_error": None},  # NaN after strict JSON
    ]
    a = M.aggregate(rows)
    assert tuple(a) == M.DOMAIN_KEYS
    assert a["n_images"] == 4
    assert a["dice_od"] == pytest.approx(85.0)
    assert a["dice_oc"] == pytest.approx(65.0)
    assert a["dice_mean"] == pytest.approx(75.0)
    assert a["asd_od"] == pytest.approx(28.0)
    assert a["asd_oc"] == pytest.approx(53.0)
    assert a["vcdr_mae"] == pytest.approx(0.2)


def test_aggregate_empty_and_all_nan_vcdr():
    a = M.aggregate([])
    assert a["n_images"] == 0 and all(math.isnan(a[k]) for k in M.DOMAIN_KEYS[1:])
    row = {"dice_od": 1.0, "dice_oc": 3.0, "asd_od": 1.0, "asd_oc": 1.0, "vcdr_error": math.nan}
    with np.errstate(all="raise"):
        a = M.aggregate([row])
    assert a["dice_mean"] == 2.0 and math.isnan(a["vcdr_mae"])


def test_aggregate_of_image_metrics_end_to_end():
    rng = np.random.default_rng(2)
    rows = []
    for _ in range(3):
        gt = np.stack([random_blob(rng, (32, 32)), random_blob(rng, (32, 32), 1)])
        pred = np.stack([random_blob(rng, (32, 32)), random_blob(rng, (32, 32), 1)])
        rows.append(M.image_metrics(pred, gt))
    a = M.aggregate(rows)
    assert a["dice_od"] == pytest.approx(np.mean([r["dice_od"] for r in rows]))
    assert a["dice_mean"] == pytest.approx(np.mean([r["dice_mean"] for r in rows]))

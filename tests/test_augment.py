"""The strong style augmentation against the specification: each transform by hand, and
the probabilities and ranges of the draws over a seeded stream."""

import numpy as np
import pytest
from scipy import ndimage

from grata import augment
from grata.augment import strong_augment

RGB = np.random.default_rng(11).random((3, 24, 24)).astype(np.float32)


def test_brightness_multiplies_each_channel():
    x = np.array([[[0.2, 0.4]], [[0.5, 1.0]], [[0.0, 0.8]]], np.float32)
    out = augment.brightness(x, np.array([0.5, 1.5, 1.25]))
    np.testing.assert_allclose(out, [[[0.1, 0.2]], [[0.75, 1.5]], [[0.0, 1.0]]], rtol=1e-6)


@pytest.mark.parametrize("factor, expected", [
    (0.5, [0.35, 0.45, 0.7]),      # mean 0.5: 0.5 + (v - 0.5) / 2
    (1.5, [0.2, 0.35, 0.9]),       # 0.05 and 1.1 clip to the channel's own min / max
])
def test_contrast_scales_around_the_mean_and_clips_to_the_previous_range(factor, expected):
    channel = np.array([[0.2, 0.4, 0.9]], np.float64)
    np.testing.assert_allclose(augment.contrast(channel, factor), [expected], rtol=1e-12)


@pytest.mark.parametrize("g, expected", [
    # inverted [-0.2,-0.4,-1] -> rescaled [1, .75, 0] -> power -> back to [-1,-0.2] -> negated
    (2.0, [0.2, 0.55, 1.0]),
    (0.5, [0.2, 1.0 - 0.8 * 0.75 ** 0.5, 1.0]),
])
def test_gamma_works_on_the_inverted_channel(g, expected):
    channel = np.array([[0.2, 0.4, 1.0]], np.float64)
    np.testing.assert_allclose(augment.gamma(channel, g), [expected], atol=1e-6)


@pytest.mark.parametrize("sigma", [0.5, 0.9, 1.5])
def test_gaussian_blur_matches_scipy(sigma):
    channel = np.random.default_rng(4).random((17, 13))
    ref = ndimage.gaussian_filter(channel, sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(augment.gaussian_blur(channel, sigma), ref, rtol=1e-12,
                               atol=1e-14)


def test_views_are_scaled_to_unit_range_and_differ_from_the_input():
    rng = np.random.default_rng(0)
    views = [strong_augment(RGB, rng) for _ in range(200)]
    for v in views:
        assert v.dtype == np.float32 and v.shape == RGB.shape
        assert v.min() == 0.0 and v.max() == pytest.approx(1.0, abs=1e-6)
    scaled = (RGB - RGB.min()) / (RGB.max() - RGB.min())
    changed = [np.abs(v - scaled).max() > 1e-3 for v in views]
    # nothing fires with probability 0.25^3 * 0.5^2 (1.6 %): nearly every view is new
    assert np.mean(changed) > 0.9
    assert not np.shares_memory(views[0], RGB)


def test_seeded_streams_repeat_and_other_seeds_differ():
    a = [strong_augment(RGB, np.random.default_rng(3)) for _ in range(2)]
    b = strong_augment(RGB, np.random.default_rng(4))
    assert np.array_equal(a[0], a[1]) and not np.array_equal(a[0], b)


class Spy:
    """Records the arguments every transform is called with (and still applies it)."""

    def __init__(self, monkeypatch):
        self.calls = {"brightness": [], "contrast": [], "gamma": [], "blur": []}
        for name, attr in (("brightness", "brightness"), ("contrast", "contrast"),
                           ("gamma", "gamma"), ("blur", "gaussian_blur")):
            real = getattr(augment, attr)

            def spy(x, p, _real=real, _name=name):
                self.calls[_name].append(np.ravel(p).copy())
                return _real(x, p)
            monkeypatch.setattr(augment, attr, spy)


def test_each_transform_fires_with_its_probability_and_range(monkeypatch):
    spy = Spy(monkeypatch)
    normal = []
    rng = np.random.default_rng(7)
    real_normal = rng.normal

    class Rng:
        def uniform(self, *a, **k):
            return rng.uniform(*a, **k)

        def normal(self, loc, scale, size):
            normal.append(scale)
            return real_normal(loc, scale, size)

    n = 2000
    x = np.random.default_rng(1).random((3, 8, 8)).astype(np.float32)
    for _ in range(n):
        strong_augment(x, Rng())
    bright = np.array(spy.calls["brightness"])
    assert len(bright) / n == pytest.approx(0.75, abs=0.04)
    assert bright.shape[1] == 3 and bright.min() >= 0.5 and bright.max() <= 1.5
    assert bright.min() < 0.55 and bright.max() > 1.45  # the whole range is used
    contrast = np.concatenate(spy.calls["contrast"])
    assert len(contrast) / (3 * n) == pytest.approx(0.75, abs=0.04)
    assert contrast.min() >= 0.5 and contrast.max() <= 1.5
    assert np.mean(contrast < 1.0) == pytest.approx(0.5, abs=0.05)
    gam = np.concatenate(spy.calls["gamma"])
    assert len(gam) / (3 * n) == pytest.approx(0.75, abs=0.04)
    assert gam.min() >= 0.5 and gam.max() <= 2.0 and gam.max() > 1.9
    assert np.mean(gam < 1.0) == pytest.approx(0.5, abs=0.05)
    # noise: variance U(0, 0.05), so the standard deviation is its square root
    assert len(normal) / n == pytest.approx(0.5, abs=0.04)
    var = np.square(normal)
    assert var.min() >= 0.0 and var.max() <= 0.05 and var.max() > 0.045
    assert np.mean(var) == pytest.approx(0.025, abs=0.003)
    # blur: the stage fires with p 0.5, then each channel with p 0.5
    sig = np.concatenate(spy.calls["blur"])
    assert len(sig) / (3 * n) == pytest.approx(0.25, abs=0.03)
    assert sig.min() >= 0.5 and sig.max() <= 1.5


def test_a_single_brightness_draw_is_the_hand_computed_view(monkeypatch):
    """Only brightness fires (scripted draws): the view is min-max(x * factors)."""
    factors = np.array([0.6, 1.4, 1.0])

    class Scripted:
        def __init__(self):
            self.stage = 0

        def uniform(self, low=0.0, high=1.0, size=None):
            if size is not None:                   # brightness factors
                assert (low, high) == (0.5, 1.5)
                return factors.reshape(size)
            self.stage += 1
            return 0.0 if self.stage == 1 else 0.99  # fire the first stage only

    out = strong_augment(RGB, Scripted())
    y = RGB.astype(np.float64) * factors[:, None, None]
    np.testing.assert_allclose(out, (y - y.min()) / (y.max() - y.min()), atol=1e-6)

"""The safety gate's scores and decisions against hand-built masks and cases."""

import math

import numpy as np
import pytest

from grata.gate import (
    VIEWS,
    Gate,
    GateConfig,
    Scores,
    agreement,
    decide,
    mean_entropy,
    plausibility,
    view_logits,
)
from grata.metrics import dice_ratio

S = 64


def ellipse(cy, cx, ry, rx, size=S):
    yy, xx = np.mgrid[0:size, 0:size]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def pred(disc, cup=None):
    return np.stack([disc, np.zeros_like(disc) if cup is None else cup])


def test_a_disc_with_its_cup_is_plausible():
    disc = ellipse(32, 30, 12, 10)
    assert plausibility(pred(disc, ellipse(32, 30, 5, 4))) == []


@pytest.mark.parametrize("make, word", [
    (lambda: pred(np.zeros((S, S), bool)), "no disc"),
    (lambda: pred(ellipse(20, 20, 8, 8) | ellipse(45, 45, 8, 8)), "several pieces"),
    (lambda: pred(ellipse(32, 32, 10, 10), ellipse(10, 10, 4, 4)), "cup outside"),
    (lambda: pred(ellipse(32, 32, 2, 2)), "disc area"),
    (lambda: pred(ellipse(32, 32, 28, 6)), "elongated"),
    (lambda: pred(ellipse(32, 32, 12, 12) & ~ellipse(32, 32, 8, 8)), "not elliptical"),
])
def test_implausible_shapes_are_named(make, word):
    fails = plausibility(make())
    assert any(word in f for f in fails), fails


def test_vcdr_above_one_is_implausible():
    disc = ellipse(32, 32, 8, 12)
    cup = disc.copy()
    cup[22:24, 30:34] = True  # a cup reaching above the disc: vertical extent > the disc's
    fails = plausibility(pred(disc, cup))
    assert "vCDR above 1" in fails


def test_agreement_and_dice_hand_values():
    a = pred(ellipse(32, 32, 10, 10), ellipse(32, 32, 4, 4))
    assert agreement(a, [a.copy(), a.copy()]) == 1.0
    assert agreement(a, []) == 1.0
    half = a.copy()
    half[0, :, :32] = False  # the disc's left half is gone in that view
    d_disc = 2 * half[0].sum() / (a[0].sum() + half[0].sum())
    d_cup = 2 * (a[1] & half[1]).sum() / (a[1].sum() + half[1].sum())
    assert agreement(a, [half]) == pytest.approx((d_disc + d_cup) / 2, abs=1e-9)
    assert dice_ratio(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def test_mean_entropy_hand_values():
    assert mean_entropy(np.zeros((1, 2, 4, 4))) == pytest.approx(1.0)
    assert mean_entropy(np.full((1, 2, 4, 4), 40.0)) < 1e-9
    p = 1 / (1 + math.exp(-1.0))
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)
    assert mean_entropy(np.ones((2, 3, 3))) == pytest.approx(h)


def test_views_map_back_to_the_image():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    for name, (fwd, inv) in VIEWS.items():
        np.testing.assert_array_equal(inv(fwd(x)), x, err_msg=name)
    # a predictor that is exactly equivariant gives views identical to its prediction

    def model(img):
        return img[:, :2] * 3.0
    for v in view_logits(model, x, list(VIEWS)):
        np.testing.assert_array_equal(v, model(x))


def ok(agree=0.9, ent=0.1):
    return Scores([], agree, ent)


def test_decision_rule_cases():
    bad = Scores(["disc in several pieces"], 0.99, 0.01)
    assert decide(bad, ok())[0] == "source"
    assert "adapted implausible" in decide(bad, ok())[1]
    assert decide(ok(), bad)[0] == "adapted"
    # both plausible: the source replaces the adapted one when it agrees better by more
    # than the margin, or when its entropy is below entropy_ratio times the adapted one's
    assert decide(ok(0.80), ok(0.90), margin=0.02)[0] == "source"
    assert decide(ok(0.89), ok(0.90), margin=0.02)[0] == "adapted"
    assert decide(ok(0.9), ok(0.9))[0] == "adapted"
    assert decide(ok(0.9, ent=0.4), ok(0.8, ent=0.2), entropy_ratio=0.75)[0] == "source"
    assert decide(ok(0.9, ent=0.4), ok(0.8, ent=0.35), entropy_ratio=0.75)[0] == "adapted"
    # without views, entropy alone decides
    assert decide(ok(0.1), ok(0.9), use_agreement=False)[0] == "adapted"
    assert decide(ok(ent=0.5), ok(ent=0.1), use_agreement=False)[0] == "source"
    # both implausible alike: the comparison goes on to the scores
    assert decide(bad, Scores(["no disc"], 0.5, 0.5))[0] == "adapted"


def test_stream_falls_back_and_recovers():
    gate = Gate(GateConfig(window=4, fallback_share=0.75, recover_share=0.25))
    bad = Scores(["no disc"], 1.0, 0.0)
    choices = [gate.judge(bad, ok())["chosen"] for _ in range(3)]
    assert choices == ["source"] * 3 and gate.fallback
    # the adapted prediction now wins per image but the stream stays on the source ...
    d = gate.judge(ok(), ok(0.5))
    assert d["chosen"] == "source" and "stream fallback" in d["reason"]
    d = gate.judge(ok(), ok(0.5))
    assert d["chosen"] == "source"   # lost share 2/4 > 0.25
    d = gate.judge(ok(), ok(0.5))    # 1/4 lost: recovered
    assert d["chosen"] == "adapted" and not gate.fallback
    state = gate.state()
    again = Gate(GateConfig(window=4, fallback_share=0.75, recover_share=0.25))
    again.load_state(state)
    assert again.state() == state


def test_config_mistakes_and_cost():
    from grata.errors import GrataError
    with pytest.raises(GrataError, match="unknown gate view"):
        GateConfig(views=("twist",))
    assert GateConfig(views=()).extra_forwards == 1
    assert GateConfig(views=("hflip", "vflip")).extra_forwards == 5

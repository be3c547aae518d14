"""GraTa and its peers against hand-derived values and a hand-written torch step."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grata import losses
from grata.augment import strong_augment
from grata.methods import METHODS, create
from grata.models import ResUnet, bn_parameters, norm_layers, set_norm_mode


class FakeEngine:
    """An engine with chosen gradients, recording the theta each gradient was taken at."""

    backend = "fake"

    def __init__(self, g_a, g_p):
        self.theta = np.array([0.5, -1.0, 2.0, 0.25])
        self.theta0 = self.theta.copy()
        self.g_a, self.g_p = np.asarray(g_a, float), np.asarray(g_p, float)
        self.seen = {}

    to_input = staticmethod(np.asarray)
    to_numpy = staticmethod(np.asarray)

    def zeros(self):
        return np.zeros_like(self.theta)

    def copy(self, a):
        return a.copy()

    def assign(self, dst, src):
        dst[...] = src

    @staticmethod
    def scalar():
        return None

    def all_finite(self, *arrays):
        return all(np.isfinite(a).all() for a in arrays)

    def infer(self, x, norm="sample"):
        return np.zeros((1, 2, 4, 4))

    def entropy_grad(self, x):
        self.seen["entropy"] = self.theta.copy()
        return 0.1, self.g_a.copy()

    def consistency_grad(self, x, strong):
        self.seen["consistency"] = self.theta.copy()
        return 0.2, self.g_p.copy()


X = np.zeros((1, 3, 4, 4))


@pytest.mark.parametrize("cos, g_p, eta", [
    (-1.0, [-1.0, -2.0, 0.5, 3.0], 0.0),
    (0.0, [2.0, -1.0, 0.0, 0.0], 1e-4 / 4),
    (1.0, [3.0, 6.0, -1.5, -9.0], 1e-4),
])
def test_learning_rate_at_cos_minus_one_zero_one(cos, g_p, eta):
    g_a = [1.0, 2.0, -0.5, -3.0]
    eng = FakeEngine(g_a, g_p)
    method = create("grata", eng, beta=1e-4)
    before = eng.theta.copy()
    method.adapt(X, strong=X)
    assert method.last["cos"] == pytest.approx(cos, abs=1e-12)
    # First Adam step: m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps), so each entry moves
    # by eta * |g| / (|g| + eps) against the sign of its gradient.
    g = np.asarray(g_p)
    expected = before - eta * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(eng.theta, expected, rtol=1e-12, atol=1e-15)


def test_perturbation_is_theta_minus_g_a_exactly_and_restored():
    g_a = [0.3, -0.7, 1e-3, 5.0]
    eng = FakeEngine(g_a, [1.0, 1.0, 1.0, 1.0])
    method = create("grata", eng)
    before = eng.theta.copy()
    method.adapt(X, strong=X)
    assert np.array_equal(eng.seen["entropy"], before)
    assert np.array_equal(eng.seen["consistency"], before - np.asarray(g_a))
    assert np.all(np.abs(eng.theta - before) <= 1e-4 + 1e-12)  # only the small Adam step


def test_noalign_takes_g_p_at_theta_and_fixedlr_uses_beta():
    eng = FakeEngine([1.0, 0, 0, 0], [-1.0, 0, 0, 0])  # cos = -1: dynamic lr would be 0
    create("grata-noalign", eng).adapt(X, strong=X)
    assert np.array_equal(eng.seen["consistency"], eng.theta0)
    eng = FakeEngine([1.0, 0, 0, 0], [-1.0, 0, 0, 0])
    create("grata-fixedlr", eng, beta=1e-4).adapt(X, strong=X)
    assert eng.theta[0] == pytest.approx(0.5 + 1e-4, abs=1e-12)


def test_non_finite_gradient_skips_update_and_is_recorded():
    eng = FakeEngine([1.0, 0, 0, 0], [np.nan, 0, 0, 0])
    method = create("grata", eng)
    method.adapt(X, strong=X)
    assert np.array_equal(eng.theta, eng.theta0)
    assert not method.m.any() and not method.v.any() and method.t == 0
    assert method.events and method.events[0]["event"] == "non-finite"
    eng.g_p = np.array([1.0, 0, 0, 0])  # the stream goes on from the restored state
    method.adapt(X, strong=X)
    assert method.t == 1 and eng.theta[0] < eng.theta0[0]


def test_teacher_views_are_the_stated_transforms_and_invert_exactly():
    x = torch.arange(2 * 5 * 5, dtype=torch.float64).reshape(1, 2, 5, 5)
    batch = losses.teacher_batch(x)
    a = x[0, 0].numpy()  # written by index: h-flip, v-flip, counter-clockwise rotations
    expected = [a, a[:, ::-1], a[::-1, :], a.T[::-1, :], a[::-1, ::-1], a.T[:, ::-1]]
    for i, e in enumerate(expected):
        assert np.array_equal(batch[i, 0].numpy(), e), f"view {i}"
    for i, (fwd, inv) in enumerate(losses.VIEWS):
        assert torch.equal(inv(fwd(x)), x), f"view {i} does not invert"


def test_entropy_is_p_log_p_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 7, 9, generator=g, dtype=torch.float64) * 3
    p = 1 / (1 + np.exp(-logits.numpy()))
    expected = np.mean(-(p * np.log(p + 1e-6)).sum(axis=1))
    assert losses.entropy_loss(logits).item() == pytest.approx(expected, rel=1e-12)
    binary = np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p)).sum(axis=1))
    assert abs(binary - expected) > 1e-2  # not the binary entropy


def test_consistency_target_is_mean_of_six_separate_sigmoid_maps():
    torch.manual_seed(0)
    model = ResUnet("edge").double()
    set_norm_mode(model, "sample")
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        target = losses.teacher_target(model(losses.teacher_batch(x)))
        maps = [torch.sigmoid(model(x)),
                torch.sigmoid(model(x.flip(3))).flip(3),
                torch.sigmoid(model(x.flip(2))).flip(2)]
        for k in (1, 2, 3):
            maps.append(torch.rot90(torch.sigmoid(model(torch.rot90(x, k, (2, 3)))), -k, (2, 3)))
    torch.testing.assert_close(target, sum(maps) / 6, rtol=1e-10, atol=1e-12)


def hand_written_grata(model, images, strongs, beta=1e-4):
    """GraTa as the authors structure it: per-tensor grads, 6 teacher passes, torch Adam."""
    for _, m in norm_layers(model):
        m.mode = "train"  # batch 1, running statistics ignored below
        m.track_running_stats = False
        m.running_mean = m.running_var = None
    model.train()
    params = bn_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=beta, betas=(0.9, 0.999), eps=1e-8)
    outputs = []
    for x, s in zip(images, strongs):
        p_ = torch.sigmoid(model(x))
        ent = (-(p_ * torch.log(p_ + 1e-6)).sum(1)).mean()
        g_a = torch.autograd.grad(ent, params)
        with torch.no_grad():
            saved = [p.clone() for p in params]
            for p, g in zip(params, g_a):
                p -= g
            views = [torch.sigmoid(model(x)), torch.sigmoid(model(x.flip(3))).flip(3),
                     torch.sigmoid(model(x.flip(2))).flip(2)]
            for k in (1, 2, 3):
                views.append(torch.rot90(torch.sigmoid(model(torch.rot90(x, k, (2, 3)))),
                                         -k, (2, 3)))
            target = sum(views) / 6
        pseudo = F.binary_cross_entropy_with_logits(model(s), target)
        g_p = torch.autograd.grad(pseudo, params)
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
        dot = sum((a * b).sum() for a, b in zip(g_p, g_a))
        na = math.sqrt(sum((a * a).sum() for a in g_a))
        np_ = math.sqrt(sum((b * b).sum() for b in g_p))
        cos = float(dot) / (np_ * na + 1e-12)
        for group in opt.param_groups:
            group["lr"] = beta * (cos + 1) ** 2 / 4
        for p, g in zip(params, g_p):
            p.grad = g.clone()
        opt.step()
        with torch.no_grad():
            outputs.append(model(x))
    return torch.cat([p.detach().reshape(-1) for p in params]), outputs


def test_grata_steps_equal_a_hand_written_torch_step_in_float64():
    torch.manual_seed(0)
    source = ResUnet("edge").double()
    for _, m in norm_layers(source):  # non-trivial affine parameters
        m.weight.data.normal_(1, 0.3)
        m.bias.data.normal_(0, 0.3)
    rng = np.random.default_rng(0)
    images = [torch.rand(1, 3, 64, 64, dtype=torch.float64) for _ in range(3)]
    strongs = [torch.from_numpy(strong_augment(x[0].numpy(), rng)).double()[None]
               for x in images]
    ref_theta, ref_out = hand_written_grata(copy.deepcopy(source), images, strongs)

    method = create("grata", copy.deepcopy(source), beta=1e-4)
    outs = [method.adapt(x, strong=s) for x, s in zip(images, strongs)]
    theta0 = method.engine.theta0
    moved = (ref_theta - theta0).abs().max()
    assert moved > 1e-5  # the steps did something to compare
    torch.testing.assert_close(method.engine.theta, ref_theta, rtol=1e-9, atol=1e-12)
    for a, b in zip(outs, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_tent_step_equals_torch_adam_on_entropy():
    torch.manual_seed(2)
    source = ResUnet("edge").double()
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    ref = copy.deepcopy(source)
    set_norm_mode(ref, "sample")
    params = bn_parameters(ref)
    opt = torch.optim.Adam(params, lr=1e-4)
    for _ in range(2):
        opt.zero_grad()
        losses.entropy_loss(ref(x)).backward()
        opt.step()
    method = create("tent", copy.deepcopy(source))
    method.adapt(x)
    method.adapt(x)
    ref_theta = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(method.engine.theta, ref_theta, rtol=1e-10, atol=1e-13)


def test_source_uses_running_stats_and_bn_current_image_stats():
    torch.manual_seed(3)
    model = ResUnet("edge")
    for _, m in norm_layers(model):
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 2)
    x = torch.rand(1, 3, 64, 64)
    ref = copy.deepcopy(model).eval()
    set_norm_mode(ref, "running")
    with torch.no_grad():
        torch.testing.assert_close(create("source", copy.deepcopy(model)).adapt(x), ref(x))
        set_norm_mode(ref, "train")
        ref.train()
        torch.testing.assert_close(create("bn", copy.deepcopy(model)).adapt(x), ref(x))


def test_reset_returns_to_source_and_strong_views_are_seeded():
    method = create("grata", ResUnet("edge"), seed=5)
    theta0 = method.engine.theta.clone()
    x = torch.rand(1, 3, 64, 64)
    first = method.draw_strong(x[0].numpy())
    method.adapt(x)
    assert not torch.equal(method.engine.theta, theta0)
    method.reset()
    assert torch.equal(method.engine.theta, theta0) and method.t == 0
    assert torch.equal(method.draw_strong(x[0].numpy()), first)


def test_every_named_method_exists():
    assert set(METHODS) == {"source", "bn", "tent", "grata", "grata-noalign", "grata-fixedlr"}

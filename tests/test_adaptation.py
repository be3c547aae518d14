"""GraTa's update, its ablations and the protocols against an independent float64
implementation written here (autograd for the gradients, Adam and the learning-rate rule
by hand), and a spy engine that records the theta every gradient is taken at."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from grata.adapt import run
from grata.augment import strong_augment
from grata.methods import create
from grata.models import ResUnet, bn_parameters, norm_layers, set_norm_mode

BETA = 1e-4
STEPS = 3
TOL = 1e-12  # float64 agreement; the steps move theta by about BETA


# ------------------------------------------------------------------ independent reference

def _entropy(logits):
    p = torch.sigmoid(logits)
    return (-(p * torch.log(p + 1e-6)).sum(1)).mean()


def _teacher(model, x):
    """Mean of the 6 sigmoid maps, each view run on its own and mapped back by hand."""
    maps = [torch.sigmoid(model(x)),
            torch.sigmoid(model(torch.flip(x, (3,)))).flip(3),
            torch.sigmoid(model(torch.flip(x, (2,)))).flip(2)]
    for k in (1, 2, 3):
        maps.append(torch.rot90(torch.sigmoid(model(torch.rot90(x, k, (2, 3)))), 4 - k, (2, 3)))
    return sum(maps) / 6


def _bce(logits, target):
    # -(t log s(z) + (1 - t) log(1 - s(z))), written with log-sigmoid for stability
    return -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean()


def reference(source, images, strongs, beta=BETA, align=True, dynamic=True):
    """GraTa in float64: per step (theta, theta the consistency gradient was taken at,
    g_a, g_p, cos, eta). Adam (0.9, 0.999, 1e-8) and eta = beta (cos + 1)^2 / 4 by hand."""
    model = copy.deepcopy(source).double()
    set_norm_mode(model, "sample")
    params = bn_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    def flat():
        return torch.cat([p.detach().reshape(-1) for p in params]).clone()

    def put(vec):
        with torch.no_grad():
            i = 0
            for p in params:
                p.copy_(vec[i:i + p.numel()].view_as(p))
                i += p.numel()

    def grad(loss):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    theta = flat()
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    steps = []
    for t, (x, s) in enumerate(zip(images, strongs), start=1):
        put(theta)
        g_a = grad(_entropy(model(x)))
        at = theta - g_a if align else theta
        put(at)
        with torch.no_grad():
            target = _teacher(model, x)
        g_p = grad(_bce(model(s), target))
        cos = float(g_p @ g_a) / (math.sqrt(float(g_p @ g_p)) * math.sqrt(float(g_a @ g_a))
                                  + 1e-12)
        eta = beta * (cos + 1) ** 2 / 4 if dynamic else beta
        m = 0.9 * m + 0.1 * g_p
        v = 0.999 * v + 0.001 * g_p * g_p
        m_hat, v_hat = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
        theta = theta - eta * m_hat / (torch.sqrt(v_hat) + 1e-8)
        steps.append({"theta": theta.clone(), "at": at.clone(), "g_a": g_a, "g_p": g_p,
                      "cos": cos, "eta": eta})
    return steps


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    source = ResUnet("edge").double()
    with torch.no_grad():
        for _, m in norm_layers(source):
            m.weight.normal_(1, 0.3)
            m.bias.normal_(0, 0.3)
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(1, 3, 64, 64, generator=gen, dtype=torch.float64)
              for _ in range(STEPS)]
    rng = np.random.default_rng(5)  # one fixed strong view per image, handed to both sides
    strongs = [torch.from_numpy(strong_augment(x[0].numpy(), rng)).double()[None]
               for x in images]
    return source, images, strongs


def run_method(name, problem, **hp):
    """(theta after each step, theta each consistency gradient was taken at, engine)."""
    source, images, strongs = problem
    method = create(name, copy.deepcopy(source), **hp)
    engine = method.engine
    seen = []
    real = engine.consistency_grad

    def spy(x, strong):
        seen.append(engine.theta.detach().clone())
        return real(x, strong)
    engine.consistency_grad = spy
    thetas = []
    for x, s in zip(images, strongs):
        method.adapt(x, strong=s)
        thetas.append(engine.theta.detach().clone())
    return thetas, seen, engine


@pytest.fixture(scope="module")
def grata_ref(problem):
    return reference(*problem)


def test_grata_trajectory_equals_the_reference_and_moves_theta(problem, grata_ref):
    thetas, seen, engine = run_method("grata", problem, beta=BETA)
    theta0 = engine.theta0
    for k, (got, ref) in enumerate(zip(thetas, grata_ref)):
        torch.testing.assert_close(got, ref["theta"], rtol=0, atol=TOL, msg=f"step {k + 1}")
    # First Adam step: m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps), so every coordinate
    # whose gradient is far above eps moves by eta_1 exactly; eta_1 is far above TOL.
    first = grata_ref[0]
    g = first["g_p"]
    torch.testing.assert_close(thetas[0] - theta0, -first["eta"] * g / (g.abs() + 1e-8),
                               rtol=1e-9, atol=TOL)
    assert first["eta"] > 1e-6 and first["eta"] > 1e5 * TOL
    moved = (thetas[-1] - theta0).abs().max().item()
    assert moved >= first["eta"] * 0.999  # a GraTa that never updates stays at theta0
    assert moved > 1e5 * TOL


def test_grata_takes_the_consistency_gradient_at_theta_minus_g_a(problem, grata_ref):
    _, seen, _ = run_method("grata", problem, beta=BETA)
    for k, (at, ref) in enumerate(zip(seen, grata_ref)):
        torch.testing.assert_close(at, ref["at"], rtol=0, atol=TOL, msg=f"step {k + 1}")
    # the perturbation has step size 1: the distance is |g_a| itself, not a scaled copy
    assert (grata_ref[0]["g_a"].abs().max() > 1e-4)


def test_noalign_takes_the_consistency_gradient_at_theta(problem, grata_ref):
    thetas, seen, engine = run_method("grata-noalign", problem, beta=BETA)
    ref = reference(*problem, align=False)
    previous = [engine.theta0] + thetas[:-1]
    for k in range(STEPS):
        torch.testing.assert_close(seen[k], previous[k], rtol=0, atol=TOL)
        torch.testing.assert_close(thetas[k], ref[k]["theta"], rtol=0, atol=TOL)
    # and so it differs from grata by more than the tolerance
    assert (thetas[-1] - grata_ref[-1]["theta"]).abs().max() > 1e3 * TOL


def test_fixedlr_steps_with_beta_and_grata_with_the_cos_rule(problem, grata_ref):
    thetas, seen, engine = run_method("grata-fixedlr", problem, beta=BETA)
    ref = reference(*problem, dynamic=False)
    g = ref[0]["g_p"]
    # first step: exactly beta * g / (|g| + eps) against the gradient
    torch.testing.assert_close(thetas[0] - engine.theta0, -BETA * g / (g.abs() + 1e-8),
                               rtol=1e-9, atol=TOL)
    for k in range(STEPS):
        torch.testing.assert_close(seen[k], ref[k]["at"], rtol=0, atol=TOL)  # still aligned
        torch.testing.assert_close(thetas[k], ref[k]["theta"], rtol=0, atol=TOL)
    # grata's first step is the same direction scaled by (cos + 1)^2 / 4 < 1
    cos = grata_ref[0]["cos"]
    assert -1 < cos < 1
    step_grata = grata_ref[0]["theta"] - engine.theta0
    torch.testing.assert_close(step_grata, (thetas[0] - engine.theta0) * (cos + 1) ** 2 / 4,
                               rtol=1e-9, atol=TOL)


def test_defaults_are_the_papers_beta_and_adam():
    """create('grata') without hyperparameters: beta 1e-4, Adam (0.9, 0.999, 1e-8); two
    steps on known gradients, computed by hand."""
    engine = SpyEngine()
    method = create("grata", engine)
    theta = engine.theta0.copy()
    m = v = np.zeros(4)
    for t in (1, 2):
        g_a = np.sin(2e4 * theta) + np.array([0.5, -0.2, 0.1, 0.3])
        g_p = np.cos(3e4 * (theta - g_a)) + np.array([0.2, -0.6, 0.4, 0.1])
        cos = g_p @ g_a / (np.linalg.norm(g_p) * np.linalg.norm(g_a) + 1e-12)
        m, v = 0.9 * m + 0.1 * g_p, 0.999 * v + 0.001 * g_p ** 2
        eta = 1e-4 * (cos + 1) ** 2 / 4
        theta = theta - eta * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        method.adapt(np.zeros((1, 3, 4, 4)), strong=np.zeros((1, 3, 4, 4)))
        np.testing.assert_allclose(engine.theta, theta, rtol=0, atol=1e-14)
    assert np.abs(theta - engine.theta0).max() > 1e-5


# ------------------------------------------------------------------ protocols

class SpyEngine:
    """Gradients of theta on a 4-vector theta; records theta at every gradient and after
    every step (the prediction), so resets are visible."""

    backend = "spy"

    def __init__(self):
        self.theta = np.array([0.5, -1.0, 2.0, 0.25])
        self.theta0 = self.theta.copy()
        self.at_entropy, self.after = [], []

    to_numpy = staticmethod(np.asarray)

    def to_input(self, image):
        return np.asarray(image)[None]

    def zeros(self):
        return np.zeros_like(self.theta)

    def copy(self, a):
        return np.array(a, copy=True)

    def assign(self, dst, src):
        dst[...] = src

    @staticmethod
    def scalar():
        return None

    def all_finite(self, *arrays):
        return all(np.isfinite(np.asarray(a, float)).all() for a in arrays)

    def infer(self, x, norm="sample"):
        self.after.append(self.theta.copy())
        return np.full((1, 2) + x.shape[-2:], -5.0)

    # Gradients are functions of theta that turn by radians per 1e-4 step, so Adam's
    # moments matter and a trajectory is reproduced only from the same state.
    def entropy_grad(self, x):
        self.at_entropy.append(self.theta.copy())
        return 0.1, np.sin(2e4 * self.theta) + np.array([0.5, -0.2, 0.1, 0.3])

    def consistency_grad(self, x, strong):
        return 0.2, np.cos(3e4 * self.theta) + np.array([0.2, -0.6, 0.4, 0.1])


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    """Two target domains of 3 images each in the GraTa CSV layout."""
    root = tmp_path_factory.mktemp("protocols")
    rng = np.random.default_rng(0)
    for domain in ("Alpha", "Beta"):
        (root / domain).mkdir()
        for split, n in (("train", 2), ("test", 1)):
            rows = ["image,mask"]
            for i in range(n):
                img = f"{domain}/{split}{i}.png"
                mask = f"{domain}/{split}{i}_mask.png"
                Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / img)
                m = np.full((32, 32), 255, np.uint8)
                m[8:24, 8:24], m[12:20, 12:20] = 128, 0
                Image.fromarray(m).save(root / mask)
                rows.append(f"{img},{mask}")
            (root / f"{domain}_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def run_protocol(root, protocol, method="grata"):
    engines = []

    def factory():
        engines.append(SpyEngine())
        return engines[-1]

    results = run(factory, root, ["Alpha", "Beta"], 32, [method], protocol=protocol,
                  progress=False)
    assert [r.target for r in results] == ["Alpha", "Beta"]
    assert all(len(r.images) == 3 for r in results)
    (engine,) = engines
    return engine, np.array(engine.at_entropy), np.array(engine.after)


@pytest.mark.parametrize("method", ["grata", "tent"])
def test_domain_protocol_resets_theta_and_adam_at_each_new_domain(two_domains, method):
    e, at, after = run_protocol(two_domains, "domain", method)
    assert np.array_equal(at[0], e.theta0) and np.array_equal(at[3], e.theta0)
    assert not np.array_equal(at[1], e.theta0)  # continual inside a domain
    assert not np.array_equal(at[2], at[1])
    # the same gradients from a fresh state: domain Beta repeats Alpha's steps exactly
    np.testing.assert_array_equal(after[3:], after[:3])


@pytest.mark.parametrize("method", ["grata", "tent"])
def test_episodic_protocol_resets_before_every_image(two_domains, method):
    e, at, after = run_protocol(two_domains, "episodic", method)
    for k in range(6):
        assert np.array_equal(at[k], e.theta0), k
        np.testing.assert_array_equal(after[k], after[0])  # step 1 of Adam every time
    assert not np.array_equal(after[0], e.theta0)


@pytest.mark.parametrize("method", ["grata", "tent"])
def test_continual_protocol_never_resets(two_domains, method):
    e, at, after = run_protocol(two_domains, "continual", method)
    assert np.array_equal(at[0], e.theta0)
    for k in range(1, 6):
        np.testing.assert_array_equal(at[k], after[k - 1])  # each step starts where the last ended
    assert not np.array_equal(at[3], e.theta0)
    # Adam's moments carry over too: Beta's first step is not Alpha's first step again
    assert not np.allclose(after[3] - at[3], after[0] - at[0], rtol=1e-6, atol=0)

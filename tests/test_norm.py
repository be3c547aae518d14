"""BN statistics as a choice (source, sample, mix, ema): the spec, the mixture formula
against hand computations, the stream estimate against a hand-written loop, and every
method on every choice on both engines."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grata.export.manifest import write_manifest
from grata.runtime import OrtEngine

from grata.errors import GrataError
from grata.methods import METHODS, create, parse_method
from grata.models import Norm2d, load_checkpoint, norm_layers, set_norm_mode, theta_layout
from grata.norm import NormSpec, ema_update, mix_stats, parse_norm, stats_views
from grata.synth import TARGET_DOMAINS, render
from grata.torch_engine import TorchEngine

SIZE = 64
NORMS = ("source", "sample", "mix:0.3", "mix:n4", "ema:0.2")


@pytest.fixture(scope="module")
def images():
    """Six fundus-like [3,S,S] images in [0, 1] from two target domains."""
    rng = np.random.default_rng(8)
    out = []
    for i in range(6):
        img = render(rng, TARGET_DOMAINS[i % 2], SIZE)[0].astype(np.float32)
        img = img.transpose(2, 0, 1)
        out.append((img - img.min()) / max(float(img.max() - img.min()), 1e-6))
    return out


# ---------------------------------------------------------------- the spec
@pytest.mark.parametrize("text, kind, alpha, momentum, canon", [
    ("sample", "sample", 1.0, None, "sample"),
    ("source", "source", 0.0, None, "source"),
    ("running", "source", 0.0, None, "source"),
    (" MIX:0.25 ", "mix", 0.25, None, "mix:0.25"),
    ("mix:a=0", "mix", 0.0, None, "mix:0"),
    ("mix:n16", "mix", 1 / 17, None, "mix:n16"),
    ("mix:n=4", "mix", 0.2, None, "mix:n4"),
    ("ema:0.1", "ema", 0.1, 0.1, "ema:0.1"),
    ("ema:m=0.1,a=0.5", "ema", 0.5, 0.1, "ema:0.1,0.5"),
    ("ema:0.05,n9", "ema", 0.1, 0.05, "ema:0.05,n9"),
])
def test_spec_parses_to_its_fields_and_round_trips(text, kind, alpha, momentum, canon):
    spec = NormSpec(text)
    assert (spec.kind, spec.momentum, str(spec)) == (kind, momentum, canon)
    assert spec.alpha == pytest.approx(alpha, rel=1e-15)
    again = NormSpec(str(spec))
    assert again == spec and again.alpha == spec.alpha
    assert copy.deepcopy(spec).alpha == spec.alpha and json.dumps(spec) == f'"{canon}"'


@pytest.mark.parametrize("bad", ["", "batch", "mix:1.5", "mix:-0.1", "mix:x", "mix:n0",
                                 "mix:0.1,0.2", "sample:1", "source:0", "ema:0", "ema:2",
                                 "mix:nan"])
def test_bad_spec_is_one_line_error(bad):
    with pytest.raises(GrataError) as err:
        NormSpec(bad)
    assert "\n" not in str(err.value) and str(err.value)


def test_keyword_parameters_and_conflicts():
    assert parse_norm("mix", alpha=0.3) == "mix:0.3"
    assert parse_norm("mix", prior_n=16).alpha == pytest.approx(1 / 17)
    assert parse_norm("ema", momentum=0.05) == "ema:0.05"
    for args in [("mix:0.2", {"alpha": 0.3}), ("mix", {"alpha": 0.3, "prior_n": 2}),
                 ("sample", {"alpha": 0.5}), ("mix", {"momentum": 0.1})]:
        with pytest.raises(GrataError):
            parse_norm(args[0], **args[1])


def test_method_specs():
    assert parse_method("grata@mix:0.2") == ("grata", NormSpec("mix:0.2"))
    assert parse_method("tent") == ("tent", None)
    assert parse_method("bn@ema:0.1")[1].momentum == 0.1
    assert parse_method("source@source") == ("source", "source")
    for bad in ("grata@mixx", "nope@mix", "source@mix:0.2", "@sample"):
        with pytest.raises(GrataError) as err:
            parse_method(bad)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- the formula
def test_mixture_moments_equal_a_weighted_pooled_sample():
    """mix_stats is the mean/variance of the mixture: the same as weighting every value
    of two samples (weights (1-a)/n_src and a/n_img) and taking moments directly."""
    rng = np.random.default_rng(0)
    src = rng.normal(1.5, 2.0, 37)
    img = rng.normal(-0.5, 0.7, 23)
    for a in (0.0, 0.2, 0.5, 1.0):
        values = np.concatenate([src, img])
        w = np.concatenate([np.full(src.size, (1 - a) / src.size),
                            np.full(img.size, a / img.size)])
        mean = np.sum(w * values)
        var = np.sum(w * (values - mean) ** 2)
        got = mix_stats(src.mean(), src.var(), img.mean(), img.var(), a)
        np.testing.assert_allclose(got, (mean, var), rtol=1e-12)


def test_norm2d_mix_mode_by_hand_and_its_limits():
    torch.manual_seed(0)
    bn = Norm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0]))
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64) * 2 + 1
    xn = x.numpy()
    a = 0.3
    bn.mode, bn.alpha = "mix", a
    got = bn(x).detach().numpy()
    for n in range(2):
        for c in range(3):
            v = xn[n, c]
            mu_s, var_s = bn.running_mean[c].item(), bn.running_var[c].item()
            mu = (1 - a) * mu_s + a * v.mean()
            var = (1 - a) * var_s + a * v.var() + a * (1 - a) * (v.mean() - mu_s) ** 2
            ref = (v - mu) / np.sqrt(var + bn.eps) * bn.weight[c].item() + bn.bias[c].item()
            np.testing.assert_allclose(got[n, c], ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.img_stats[0].numpy(), xn.mean((2, 3)), rtol=1e-12)
    np.testing.assert_allclose(bn.img_stats[1].numpy(), xn.var((2, 3)), rtol=1e-12)
    bn.alpha = 1.0
    torch.testing.assert_close(bn(x), F.instance_norm(x, weight=bn.weight, bias=bn.bias,
                                                      eps=bn.eps), rtol=1e-12, atol=1e-12)
    bn.alpha = 0.0
    with torch.no_grad():
        ref = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False,
                           0.0, bn.eps)
    torch.testing.assert_close(bn(x), ref, rtol=1e-12, atol=1e-12)
    # a prior given explicitly replaces the running statistics
    bn.alpha, bn.prior = 0.0, (torch.zeros(3), torch.ones(3))
    torch.testing.assert_close(bn(x), ((x - 0) / np.sqrt(1 + bn.eps)) * bn.weight.view(1, 3, 1, 1)
                               + bn.bias.view(1, 3, 1, 1), rtol=1e-12, atol=1e-12)


def test_stats_views_and_ema_update_by_hand():
    layout = [{"name": "a.weight", "offset": 0, "shape": [2]},
              {"name": "a.bias", "offset": 2, "shape": [2]},
              {"name": "b.weight", "offset": 4, "shape": [1]},
              {"name": "b.bias", "offset": 5, "shape": [1]}]
    assert stats_views(layout) == [(slice(0, 2), slice(2, 4)), (slice(4, 5), slice(5, 6))]
    s = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    img = np.array([2.0, 0.0, 1.0, 1.0, 5.0, 2.0])
    m = 0.25
    want = np.array([1.25, 1.5, 3 * 0.75 + 0.25 + 0.1875 * 1, 4 * 0.75 + 0.25 + 0.1875 * 4,
                     5.0, 6 * 0.75 + 0.5])
    for cast in (np.asarray, torch.tensor):
        got = cast(s.copy())
        ema_update(got, cast(img), m, layout)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-15)


# ---------------------------------------------------------------- the stream estimate
def _first_layer_stats(model, image):
    """Mean and biased variance of the stem convolution's output, by hand."""
    conv = model.res.conv1
    with torch.no_grad():
        y = F.conv2d(torch.from_numpy(image)[None].double(), conv.weight.double(), None,
                     conv.stride, conv.padding)[0].numpy()
    return y.mean((1, 2)), y.var((1, 2))


def test_ema_follows_a_hand_written_loop_and_resets(edge64, images):
    model = load_checkpoint(edge64[0], "edge")
    m = 0.3
    method = create("bn", copy.deepcopy(model), norm=f"ema:{m}")
    e = method.engine
    stats0 = e.stats0.numpy().copy()
    layout = theta_layout(model)
    (mean0, var0) = stats_views(layout)[0]
    np.testing.assert_array_equal(stats0[mean0], model.res.bn1.running_mean.numpy())
    expect = stats0.astype(np.float64)
    first = (expect[mean0].copy(), expect[var0].copy())
    outs, before = [], []
    for img in images[:3]:
        before.append(e.norm_state())
        outs.append(method.adapt(e.to_input(img)))
        img_stats = e.img_stats.numpy().astype(np.float64)
        # the whole vector: the update rule, written out here
        for mv, vv in stats_views(layout):
            d = img_stats[mv] - expect[mv]
            expect[vv] = (1 - m) * expect[vv] + m * img_stats[vv] + m * (1 - m) * d * d
            expect[mv] = (1 - m) * expect[mv] + m * img_stats[mv]
        # the first layer: its image statistics by hand too (the stem sees the raw image)
        mu, var = _first_layer_stats(model, img)
        d = mu - first[0]
        first = ((1 - m) * first[0] + m * mu,
                 (1 - m) * first[1] + m * var + m * (1 - m) * d * d)
        np.testing.assert_allclose(e.stats.numpy(), expect, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(e.stats.numpy()[mean0], first[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(e.stats.numpy()[var0], first[1], rtol=1e-5, atol=1e-6)
    assert np.abs(e.norm_state() - stats0).max() > 1e-2  # the stream moved the estimate
    # image 3 was normalised with the estimate of images 1-2 mixed with its own at a = m
    fresh = TorchEngine(copy.deepcopy(model))
    fresh.load_norm_state(before[2])
    torch.testing.assert_close(fresh.infer(fresh.to_input(images[2]), norm=f"ema:{m}"),
                               outs[2])
    assert not torch.allclose(outs[2], fresh.infer(fresh.to_input(images[2]),
                                                   norm=f"mix:{m}"), atol=1e-4)
    method.reset()
    np.testing.assert_array_equal(e.norm_state(), stats0)
    again = method.adapt(e.to_input(images[0]))
    torch.testing.assert_close(again, outs[0], rtol=0, atol=0)


def test_non_finite_image_keeps_the_stream_estimate(edge64, images):
    method = create("bn", OrtEngine(edge64[1], threads=1), norm="ema:0.5")
    e = method.engine
    bad = np.full((3, SIZE, SIZE), np.nan, np.float32)
    method.adapt(e.to_input(bad), image=bad)
    np.testing.assert_array_equal(e.stats, e.stats0)
    assert method.events[-1]["event"] == "non-finite statistics"
    method.adapt(e.to_input(images[0]), image=images[0])
    assert np.isfinite(e.stats).all() and not np.array_equal(e.stats, e.stats0)
    with pytest.raises(GrataError):
        e.load_norm_state(np.zeros(3))


def test_ema_checks_once_per_image_and_a_broken_estimate_is_undone(edge64, images):
    """grata@ema syncs once per image (the update's check also covers the estimate the
    last image moved); a non-finite image's statistics are undone before the next step
    counts, and that step is taken on the restored estimate."""
    method = create("grata", OrtEngine(edge64[1], threads=1), norm="ema:0.5", seed=3)
    e = method.engine
    checks = []
    real = e.all_finite
    e.all_finite = lambda *a: checks.append(len(a)) or real(*a)
    for img in images[:3]:
        method.adapt(e.to_input(img), image=img)
    assert len(checks) == 3  # one check per image
    assert np.isfinite(e.stats).all() and not method.events
    before, t = e.stats.copy(), method.t
    bad = np.full((3, SIZE, SIZE), np.nan, np.float32)
    method.adapt(e.to_input(bad), image=bad)
    assert [ev["event"] for ev in method.events] == ["non-finite"]
    method.adapt(e.to_input(images[0]), image=images[0])
    assert [(ev["event"], ev["image"]) for ev in method.events] == [
        ("non-finite", 4), ("non-finite statistics", 4)]
    assert method.t == t + 1  # the fifth image's step was taken, on the restored estimate
    assert np.isfinite(e.stats).all() and not np.array_equal(e.stats, before)
    assert np.isfinite(e.theta).all()


# ---------------------------------------------------------------- methods x statistics
def test_source_is_fixed_and_bn_at_source_is_source(edge64, images):
    model = load_checkpoint(edge64[0], "edge")
    x = torch.from_numpy(images[0])[None]
    ref = copy.deepcopy(model)
    set_norm_mode(ref, "running")
    with torch.no_grad():
        want = ref(x)
    src = create("source", copy.deepcopy(model), norm="mix:0.5")
    assert src.norm == "source"
    torch.testing.assert_close(src.adapt(x), want)
    torch.testing.assert_close(create("bn", copy.deepcopy(model), norm="source").adapt(x), want)


@pytest.mark.parametrize("norm", NORMS)
def test_every_method_runs_on_every_choice(edge64, images, norm):
    model = load_checkpoint(edge64[0], "edge")
    outs = {}
    for name in METHODS:
        method = create(name, copy.deepcopy(model), norm=norm, seed=1,
                        **({"lr": 1e-2} if name == "tent" else
                           {"beta": 1e-2} if name.startswith("grata") else {}))
        e = method.engine
        for img in images[:2]:
            outs[name] = method.adapt(e.to_input(img))
        assert torch.isfinite(outs[name]).all() and not method.events
        assert method.norm == ("source" if name == "source" else NormSpec(norm))
        moved = (e.theta - e.theta0).abs().max().item()
        assert (moved > 1e-4) == method.updates, (name, moved)
    if norm != "source":  # the statistics choice changes what bn predicts
        assert (outs["bn"] - outs["source"]).abs().max() > 1e-3


def test_mixed_gradients_at_zero_are_the_source_gradients(edge64, images):
    e = TorchEngine(load_checkpoint(edge64[0], "edge"))
    x = e.to_input(images[1])
    loss0, g0 = e.entropy_grad(x, norm="mix:0")
    loss_s, g_s = e.entropy_grad(x, norm="source")
    torch.testing.assert_close(loss0, loss_s, rtol=1e-6, atol=0)
    torch.testing.assert_close(g0, g_s, rtol=1e-5, atol=1e-6 * g_s.abs().max().item())
    ort = OrtEngine(edge64[1], threads=1)
    loss_o, g_o = ort.entropy_grad(ort.to_input(images[1]), norm="source")
    assert loss_o == pytest.approx(loss_s.item(), rel=1e-5)
    rel = np.linalg.norm(g_o - g_s.numpy()) / np.linalg.norm(g_s.numpy())
    assert rel <= 1e-4, rel


@pytest.mark.parametrize("name, norm, hp", [("grata", "mix:0.3", {"beta": 1e-3}),
                                            ("tent", "ema:0.2", {"lr": 1e-3}),
                                            ("grata", "mix:n16", {"beta": 1e-3}),
                                            ("tent", "source", {"lr": 1e-3})])
def test_onnx_stream_follows_torch(edge64, images, name, norm, hp):
    ckpt, art = edge64
    ref = create(name, load_checkpoint(ckpt, "edge"), norm=norm, seed=3, **hp)
    ort = create(name, OrtEngine(art, threads=2), norm=norm, seed=3, **hp)
    for img in images:
        a = ref.adapt(ref.engine.to_input(img), image=img)
        b = ort.adapt(ort.engine.to_input(img), image=img)
        assert np.mean((a.numpy() > 0) == (b > 0)) >= 0.999
    t_ref = ref.engine.theta.numpy().astype(np.float64)
    t0 = ref.engine.theta0.numpy().astype(np.float64)
    assert np.linalg.norm(t_ref - t0) > 1e-3  # the stream moved theta
    assert np.linalg.norm(ort.engine.theta - t_ref) / np.linalg.norm(t_ref) <= 1e-5
    s_ref = ref.engine.norm_state().astype(np.float64)
    assert np.linalg.norm(ort.engine.norm_state() - s_ref) / np.linalg.norm(s_ref) <= 1e-5
    if norm.startswith("ema"):
        assert np.abs(s_ref - ref.engine.stats0.numpy()).max() > 1e-2


# ---------------------------------------------------------------- older artifacts
def test_artifacts_without_mixed_graphs_say_export_again(edge64, images, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(edge64[1], old)
    fields = json.loads((old / "manifest.json").read_text())
    for key in ("format_version", "sha256", "manifest_sha256", "stats0", "norms", "mix_graphs"):
        fields.pop(key)
    for role in ("infer_mix", "entropy_grad_mix", "consistency_grad_mix"):
        (old / fields["graphs"].pop(role)).unlink()
        fields["io"].pop(role)
    (old / "stats0.npy").unlink()
    write_manifest(old, fields)
    x = images[0]
    eng = OrtEngine(old, threads=1)
    assert eng.stats is None
    create("grata", eng).adapt(eng.to_input(x), image=x)  # the paper's setting still runs
    create("source", eng).adapt(eng.to_input(x))
    for name, norm in (("bn", "mix:0.2"), ("tent", "ema:0.1"), ("tent", "source")):
        method = create(name, eng, norm=norm)
        with pytest.raises(GrataError) as err:
            method.adapt(eng.to_input(x), image=x)
        msg = str(err.value)
        assert "\n" not in msg and "export again" in msg and "_mix" in msg, msg


def test_layer_count_matches_the_stats_vector(edge64):
    model = load_checkpoint(edge64[0], "edge")
    e = TorchEngine(model)
    assert e.stats0.numel() == e.theta.numel() == 2 * sum(m.num_features
                                                           for _, m in norm_layers(model))

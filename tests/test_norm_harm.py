"""benchmarks/norm_harm.py: its mixed statistics are the mixture's moments, a = 0 and
a = 1 are the source and per-image rules, and the table runs on a small benchmark."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from grata import defaults
from grata.models import Norm2d, load_checkpoint
from grata.synth import generate

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "norm_harm.py"


@pytest.fixture(scope="module")
def norm_harm():
    spec = importlib.util.spec_from_file_location("norm_harm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _One(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = Norm2d(4)


def test_mixed_statistics_are_the_moments_of_the_mixture(norm_harm):
    torch.manual_seed(0)
    net = _One().double()
    bn = net.bn
    bn.running_mean.copy_(torch.randn(4))
    bn.running_var.copy_(torch.rand(4) + 0.5)
    bn.weight.data.copy_(torch.randn(4))
    bn.bias.data.copy_(torch.randn(4))
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64) * 2 + 1
    a = 0.3
    norm_harm.set_statistics(net, "mix", a)
    got = net.bn(x).detach().numpy()
    # Reference from first and second moments: E[x^2] of the mixture, minus its mean^2.
    xn = x.numpy()
    m_img, m2_img = xn.mean((2, 3)), (xn ** 2).mean((2, 3))
    m_src = bn.running_mean.numpy()[None]
    m2_src = bn.running_var.numpy()[None] + m_src ** 2
    mu = (1 - a) * m_src + a * m_img
    var = (1 - a) * m2_src + a * m2_img - mu ** 2
    want = ((xn - mu[..., None, None]) / np.sqrt(var[..., None, None] + bn.eps)
            * bn.weight.detach().numpy()[:, None, None] + bn.bias.detach().numpy()[:, None, None])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_mix_ends_are_source_and_bn_on_the_shipped_model(norm_harm):
    model = load_checkpoint(defaults.checkpoint(), defaults.DEFAULT_ARCH)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = {}
    with torch.no_grad():
        for key, rule, a in (("source", "source", None), ("mix0", "mix", 0.0),
                             ("bn", "bn", None), ("mix1", "mix", 1.0), ("mid", "mix", 0.5)):
            norm_harm.set_statistics(model, rule, a)
            out[key] = model(x)
    torch.testing.assert_close(out["mix0"], out["source"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["mix1"], out["bn"], rtol=1e-4, atol=1e-4)
    assert (out["mid"] - out["source"]).abs().max() > 1e-2  # the weight matters between


def test_table_on_a_small_benchmark(norm_harm, tmp_path, capsys):
    generate(tmp_path / "d", seed=1, n_source=(1, 0), n_target=(1, 1), size=64,
             progress=False)
    rc = norm_harm.main(["--data", str(tmp_path / "d"), "--source", "Clinic",
                         "--targets", "WideCrop,BorderFOV", "--size", "64", "--mix", "0.2",
                         "--json", str(tmp_path / "t.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mix 0.2" in out and "WideCrop" in out and "BorderFOV" in out
    table = json.loads((tmp_path / "t.json").read_text())["table"]
    assert set(table) == {"WideCrop", "BorderFOV"}
    assert all(r["n_images"] == 2 and 0 <= r["bn"] <= 100 for r in table.values())


def test_bad_mix_weight_is_a_user_error(norm_harm, capsys):
    assert norm_harm.main(["--mix", "1.5"]) == 2
    assert "--mix" in capsys.readouterr().err

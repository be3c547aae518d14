"""benchmarks/norm_harm.py: its rules are the model's statistics modes (a = 0 and a = 1 of
``mix`` are the source and per-image rules; the mixture's arithmetic is tested in
test_norm.py), and the table runs on a small benchmark."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from grata import defaults
from grata.models import load_checkpoint
from grata.synth import generate

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "norm_harm.py"


@pytest.fixture(scope="module")
def norm_harm():
    spec = importlib.util.spec_from_file_location("norm_harm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

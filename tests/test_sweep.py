"""benchmarks/sweep.py: configurations, the do-no-harm summary by hand, and a tiny run
whose Dice per target matches `grata.adapt.run` called directly."""

import importlib.util
import json
from pathlib import Path

import pytest

from grata.adapt import run
from grata.runtime import OrtEngine
from grata.synth import generate

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configs_parse_and_the_grid(sweep):
    c = sweep.Config.parse("grata@mix:0.20/1e-2")
    assert (c.method, c.rule, c.step, c.label) == ("grata", "mix:0.2", 0.01,
                                                   "grata@mix:0.2/0.01")
    assert c.hyperparameters() == {"beta": 0.01}
    assert sweep.Config.parse("tent@source/0.1").hyperparameters() == {"lr": 0.1}
    assert sweep.Config.parse("source").hyperparameters() == {}
    for bad in ("grata@mix:0.2", "bn@sample/1e-3", "adam@sample/1", "tent@sample/x",
                "grata@mix:7/1e-3"):
        with pytest.raises(sweep.GrataError):
            sweep.Config.parse(bad)
    labels = [c.label for c in sweep.grid(["sample", "source"], [1e-3], ["grata", "tent"])]
    # bn under source statistics is source itself: not run twice
    assert labels == ["source", "bn@sample", "grata@sample/0.001", "tent@sample/0.001",
                      "grata@source/0.001", "tent@source/0.001"]


def test_summary_by_hand(sweep):
    dice = {"source": {"A": 80.0, "B": 60.0},
            "bn@sample": {"A": 90.0, "B": 58.5},
            "grata@mix:0.2/0.01": {"A": 81.0, "B": 59.5}}
    s = sweep.summarise(dice, ["A", "B"])
    assert s["source"]["worst_vs_source"] == 0.0 and s["source"]["harmed"] == []
    assert s["bn@sample"]["mean"] == pytest.approx(74.25)
    assert s["bn@sample"]["worst_vs_source"] == pytest.approx(-1.5)
    assert s["bn@sample"]["worst_target"] == "B" and s["bn@sample"]["harmed"] == ["B"]
    assert s["grata@mix:0.2/0.01"]["harmed"] == []  # 0.5 below is within the margin


def test_small_run_matches_adapt_run(sweep, edge64, tmp_path, capsys):
    _, art = edge64
    root = tmp_path / "d"
    generate(root, seed=2, n_source=(1, 0), n_target=(2, 1), size=64, progress=False)
    out = tmp_path / "s.json"
    rc = sweep.main(["--data", str(root), "--source", "Clinic",
                     "--targets", "WideCrop,Handheld", "--artifacts", str(art),
                     "--size", "64", "--images", "2",
                     "--configs", "grata@mix:0.2/1e-2,tent@mix:0.2/1e-2,bn@sample",
                     "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "grata@mix:0.2/0.01" in table and "WideCrop" in table
    got = json.loads(out.read_text())["configs"]
    assert set(got) == {"source", "grata@mix:0.2/0.01", "tent@mix:0.2/0.01", "bn@sample"}
    # The same run without the script (its first two images per target: train split).
    short = tmp_path / "short"
    generate(short, seed=2, n_source=(1, 0), n_target=(2, 0), size=64, progress=False)
    ref = run(lambda: OrtEngine(art, threads=1), short, ["WideCrop", "Handheld"], 64,
              ["grata"], seed=0, progress=False,
              hyperparameters={"grata": {"beta": 1e-2}}, norm="mix:0.2")
    for r in ref:
        assert got["grata@mix:0.2/0.01"]["per_target"][r.target] == pytest.approx(
            r.summary()["dice_mean"], abs=1e-9)
    src = got["source"]["per_target"]
    for label, row in got.items():
        assert row["worst_vs_source"] == pytest.approx(
            min(row["per_target"][t] - src[t] for t in src))


def test_bad_arguments_are_user_errors(sweep, capsys):
    assert sweep.main(["--configs", "grata@sample"]) == 2
    assert "step" in capsys.readouterr().err
    assert sweep.main(["--steps", "1e-3,x"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_gated_configs_parse(sweep):
    c = sweep.Config.parse("bn@mix:0.2+gate")
    assert (c.spec, c.label, c.gate, c.step) == ("bn@mix:0.2+gate", "bn@mix:0.2+gate", True,
                                                 None)
    g = sweep.Config.parse("grata@mix:0.2+gate/1e-5")
    assert (g.spec, g.label, g.hyperparameters()) == ("grata@mix:0.2+gate",
                                                      "grata@mix:0.2+gate/1e-05",
                                                      {"beta": 1e-5})


def test_scaled_run_matches_adapt_run_with_the_scale(sweep, tmp_path, capsys):
    """--scale auto: every configuration (source too) behind the disc-scale stage, the
    same Dice per target as `grata.adapt.run(..., scale=)`; a gated config is judged."""
    from grata.disc_scale import DiscScale
    from grata.export import export_artifacts
    from grata.models import ResUnet, save_checkpoint
    import torch
    torch.manual_seed(1)
    save_checkpoint(ResUnet("edge"), tmp_path / "m.pt")
    scale = DiscScale.given(0.34)
    art = tmp_path / "art"
    export_artifacts(tmp_path / "m.pt", "edge", 64, art, disc_scale=scale)
    root = tmp_path / "d"
    generate(root, seed=2, n_source=(1, 0), n_target=(2, 0), size=96, progress=False)
    out = tmp_path / "s.json"
    argv = ["--data", str(root), "--source", "Clinic", "--targets", "FarCrop",
            "--artifacts", str(art), "--size", "64",
            "--configs", "bn@mix:0.2,bn@mix:0.2+gate", "--json", str(out)]
    assert sweep.main(argv + ["--scale", "auto"]) == 0
    got = json.loads(out.read_text())
    assert got["meta"]["scale"] == "auto"
    ref = run(lambda: OrtEngine(art, threads=1), root, ["FarCrop"], 64,
              ["source", "bn@mix:0.2"], seed=0, progress=False, scale=scale)
    for r in ref:
        assert got["configs"][r.method]["per_target"]["FarCrop"] == pytest.approx(
            r.summary()["dice_mean"], abs=1e-9)
    plain = run(lambda: OrtEngine(art, threads=1), root, ["FarCrop"], 64, ["source"],
                seed=0, progress=False)
    assert plain[0].summary()["dice_mean"] != pytest.approx(
        got["configs"]["source"]["per_target"]["FarCrop"], abs=1e-9)  # the stage ran
    assert "bn@mix:0.2+gate" in got["configs"]
    capsys.readouterr()
    edge = tmp_path / "noscale"
    export_artifacts(tmp_path / "m.pt", "edge", 64, edge)
    argv[argv.index(str(art))] = str(edge)
    assert sweep.main(argv + ["--scale", "auto"]) == 2
    assert "disc scale: unknown" in capsys.readouterr().err

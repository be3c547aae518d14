"""The command line: reports, bad input as one clear line, results never lost."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from grata.cli import main
from grata.product import PRODUCT_HP, PRODUCT_NORM
from grata.models import ResUnet, save_checkpoint
from grata.synth import SOURCE_DOMAIN, TARGET_DOMAINS, generate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small synthetic benchmark and an (untrained) edge checkpoint."""
    root = tmp_path_factory.mktemp("bench")
    generate(root / "data", seed=3, n_source=(2, 1), n_target=(2, 1), size=96, progress=False)
    save_checkpoint(ResUnet("edge"), root / "edge.pt")
    return root


def adapt_args(tiny, out, *extra):
    return ["adapt", "--data", str(tiny / "data"), "--source", SOURCE_DOMAIN,
            "--checkpoint", str(tiny / "edge.pt"), "--arch", "edge", "--size", "64",
            "--engine", "torch", "--quiet", "--out", str(out), *extra]


def test_adapt_writes_the_report_schema_and_table(tiny, tmp_path, capsys):
    targets = ",".join(TARGET_DOMAINS[:2])
    rc = main(adapt_args(tiny, tmp_path / "run", "--targets", targets,
                         "--methods", "source,bn,tent,grata", "--overlays", "--plot"))
    assert rc == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["complete"] is True
    pairs = {(r["method"], r["target"]) for r in report["results"]}
    assert pairs == {(m, t) for m in ("source", "bn", "tent", "grata")
                     for t in TARGET_DOMAINS[:2]}
    for r in report["results"]:
        for key in ("method", "target", "n_images", "dice_od", "dice_oc", "dice_mean",
                    "vcdr_mae", "skipped", "images"):
            assert key in r
        assert r["n_images"] == 3 == len(r["images"])
        assert r["dice_mean"] == pytest.approx(np.mean([i["dice_mean"] for i in r["images"]]))
    out = capsys.readouterr().out
    assert "source" in out and "grata" in out and TARGET_DOMAINS[0][:10] in out
    assert (tmp_path / "run" / "dice_stream.png").stat().st_size > 1000
    assert len(list((tmp_path / "run" / "overlays").rglob("*.png"))) == 4 * 2 * 3


def test_bad_image_in_stream_is_skipped_and_reported(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    target = TARGET_DOMAINS[0]
    first = sorted((data / target).rglob("*"))
    images = [p for p in first if p.is_file() and "mask" not in str(p)]
    images[0].write_bytes(images[0].read_bytes()[:100])  # truncated file
    rc = main(["adapt", "--data", str(data), "--source", SOURCE_DOMAIN, "--targets", target,
               "--checkpoint", str(tiny / "edge.pt"), "--arch", "edge", "--size", "64",
               "--methods", "bn,grata", "--engine", "torch", "--quiet", "--out", str(tmp_path / "run")])
    assert rc == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    for r in report["results"]:
        assert r["n_images"] == 2
        assert len(r["skipped"]) == 1 and r["skipped"][0]["reason"]
    assert "skipped" in capsys.readouterr().out


@pytest.mark.parametrize("change, words", [
    (["--targets", "Nowhere"], "Nowhere"),
    (["--methods", "source,magic"], "unknown method 'magic'"),
    (["--size", "100"], "multiple of 32"),
])
def test_user_mistakes_are_one_line_errors(tiny, tmp_path, capsys, change, words):
    rc = main(adapt_args(tiny, tmp_path / "run", *change))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and words in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_missing_data_root_and_bad_checkpoint(tiny, tmp_path, capsys):
    assert main(["adapt", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                 "--checkpoint", str(tiny / "edge.pt"), "--arch", "edge", "--quiet"]) == 2
    assert "none" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"\0" * 64)
    rc = main(adapt_args(tiny, tmp_path / "o", "--checkpoint", str(tmp_path / "bad.pt")))
    err = capsys.readouterr().err
    assert rc == 2 and "bad.pt" in err and "Traceback" not in err
    rc = main(adapt_args(tiny, tmp_path / "o", "--arch", "resnet34"))
    assert rc == 2 and "does not match arch" in capsys.readouterr().err


def test_empty_domain_is_a_clear_error(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    for split in ("train", "test"):
        (data / f"Empty_{split}.csv").write_text("image,mask\n")
    args = adapt_args(tiny, tmp_path / "o", "--targets", "Empty")
    args[args.index("--data") + 1] = str(data)
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "Empty" in err and "Traceback" not in err


def test_grey_and_rgba_images_run_through_the_stream(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    target = TARGET_DOMAINS[1]
    rows = (data / f"{target}_train.csv").read_text().splitlines()
    paths = [r.split(",")[0] for r in rows[1:]]
    img = np.asarray(Image.open(data / paths[0]).convert("RGB"))
    Image.fromarray(img[..., 1]).save(data / paths[0])                       # grey
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(data / paths[1])                      # RGBA
    rc = main(["adapt", "--data", str(data), "--source", SOURCE_DOMAIN, "--targets", target,
               "--checkpoint", str(tiny / "edge.pt"), "--arch", "edge", "--size", "64",
               "--methods", "bn", "--engine", "torch", "--quiet", "--out", str(tmp_path / "run")])
    assert rc == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["results"][0]["n_images"] == 3 and not report["results"][0]["skipped"]


def test_help_teaches_and_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "grata.cli", "adapt", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for word in ("--methods", "--protocol", "--engine", "report.json", "examples"):
        assert word in out


def test_hyperparameter_mistakes_are_one_line(tiny, tmp_path, capsys):
    for item, words in (("grata.bta=1e-3", "grata has no hyperparameter 'bta'"),
                        ("tent.lr=1e-3", "method 'tent' is not in this run")):
        rc = main(adapt_args(tiny, tmp_path / "run", "--methods", "bn,grata", "--hp", item))
        err = capsys.readouterr().err.strip()
        assert rc == 2 and words in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "report.json").exists()


def _args_from_config(config: dict, out) -> list[str]:
    """The command line that a report's config block describes."""
    args = ["adapt", "--data", config["data"], "--source", config["source"],
            "--targets", ",".join(config["targets"]), "--checkpoint", config["checkpoint"],
            "--arch", config["arch"], "--size", str(config["size"]),
            "--engine", config["engine"], "--device", config["device"],
            "--protocol", config["protocol"], "--seed", str(config["seed"]),
            "--methods", ",".join(config["methods"]), "--norm", config["norm"],
            "--quiet", "--out", str(out)]
    for method, hp in config["methods"].items():
        for name, value in hp.items():
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            args += ["--hp", f"{method}.{name}={text}"]
    return args


def test_report_config_reproduces_the_run(tiny, tmp_path):
    from grata.digest import file_sha256
    rc = main(adapt_args(tiny, tmp_path / "a", "--targets", TARGET_DOMAINS[0],
                         "--methods", "tent,grata", "--seed", "4", "--protocol", "continual",
                         "--hp", "grata.beta=0.05", "--hp", "tent.betas=0.5,0.9"))
    assert rc == 0
    first = json.loads((tmp_path / "a" / "report.json").read_text())
    config = first["config"]
    # the product's step size where --hp gives none (grata.product), the user's elsewhere
    assert config["methods"] == {"tent": {"lr": PRODUCT_HP["tent"]["lr"], "betas": [0.5, 0.9],
                                          "eps": 1e-8},
                                 "grata": {"beta": 0.05, "betas": [0.9, 0.999], "eps": 1e-8}}
    assert config["norm"] == PRODUCT_NORM
    assert config["checkpoint_sha256"] == file_sha256(tiny / "edge.pt")
    assert config["grata_version"] and config["seed"] == 4 and config["size"] == 64
    assert main(_args_from_config(config, tmp_path / "b")) == 0
    again = json.loads((tmp_path / "b" / "report.json").read_text())
    assert again["config"] == config
    for r1, r2 in zip(first["results"], again["results"]):
        rows1 = [{k: v for k, v in i.items() if k != "time_s"} for i in r1["images"]]
        rows2 = [{k: v for k, v in i.items() if k != "time_s"} for i in r2["images"]]
        assert rows1 == rows2
    # and the hyperparameters did reach the methods: the default beta gives other losses
    assert main(adapt_args(tiny, tmp_path / "c", "--targets", TARGET_DOMAINS[0],
                           "--methods", "grata", "--seed", "4", "--protocol", "continual")) == 0
    default = json.loads((tmp_path / "c" / "report.json").read_text())
    ent_a = [i["loss_ent"] for i in first["results"][1]["images"]]
    ent_c = [i["loss_ent"] for i in default["results"][0]["images"]]
    assert ent_a[0] == ent_c[0] and ent_a[1:] != ent_c[1:]


def test_defaults_are_the_products_and_paper_is_the_papers(tiny, tmp_path):
    """No flag: the measured product defaults (grata.product); --paper: per-image
    statistics and the constructors' own step sizes, i.e. the authors' GraTa and TENT."""
    assert main(adapt_args(tiny, tmp_path / "p", "--targets", TARGET_DOMAINS[0],
                           "--methods", "tent,grata")) == 0
    product = json.loads((tmp_path / "p" / "report.json").read_text())["config"]
    assert product["norm"] == PRODUCT_NORM and product["norms"] == {
        "tent": PRODUCT_NORM, "grata": PRODUCT_NORM}
    assert product["methods"]["grata"]["beta"] == PRODUCT_HP["grata"]["beta"]
    assert product["methods"]["tent"]["lr"] == PRODUCT_HP["tent"]["lr"]
    assert main(adapt_args(tiny, tmp_path / "q", "--targets", TARGET_DOMAINS[0],
                           "--methods", "tent,grata", "--paper")) == 0
    paper = json.loads((tmp_path / "q" / "report.json").read_text())["config"]
    assert paper["norm"] == "sample" and paper["norms"] == {"tent": "sample", "grata": "sample"}
    assert paper["methods"] == {"tent": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8},
                                "grata": {"beta": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8}}


def test_one_method_under_two_rules_is_two_rows_and_reproduces(tiny, tmp_path, capsys):
    """grata@sample and grata@mix:0.3 in one run: two rows keyed by the spec, two config
    entries with their rules and hyperparameters, the printed table's rows match
    report.json, and the run reproduces from its config block alone."""
    rc = main(adapt_args(tiny, tmp_path / "a", "--targets", TARGET_DOMAINS[0],
                         "--norm", "mix:n4", "--methods", "grata@sample,grata@mix:0.30,tent,source",
                         "--hp", "grata.beta=0.05", "--hp", "grata@mix:0.3.eps=1e-6",
                         "--overlays"))
    assert rc == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    keys = ["grata@sample", "grata@mix:0.3", "tent", "source"]
    assert [r["method"] for r in report["results"]] == keys
    config = report["config"]
    assert config["norm"] == "mix:n4"
    assert config["norms"] == {"grata@sample": "sample", "grata@mix:0.3": "mix:0.3",
                               "tent": "mix:n4", "source": "source"}
    assert config["methods"]["grata@sample"] == {"beta": 0.05, "betas": [0.9, 0.999],
                                                 "eps": 1e-8}
    assert config["methods"]["grata@mix:0.3"] == {"beta": 0.05, "betas": [0.9, 0.999],
                                                  "eps": 1e-6}
    # the printed table: one row per spec, its mean over targets as in report.json
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()
             and line.split()[0] in keys}
    assert set(lines) == set(keys)
    for key in keys:
        printed = float(lines[key].split()[-1])
        assert printed == pytest.approx(report["mean_over_targets"][key]["dice_mean"], abs=0.006)
    # the two rules really differ: per-image statistics vs mixed give other losses
    rows = {r["method"]: r["images"] for r in report["results"]}
    assert [i["loss_ent"] for i in rows["grata@sample"]] != \
        [i["loss_ent"] for i in rows["grata@mix:0.3"]]
    assert {p.parent.parent.name for p in (tmp_path / "a" / "overlays").rglob("*.png")} == \
        {"grata@sample", "grata@mix_0.3", "tent", "source"}
    from grata.report_html import overlay_path
    for r in report["results"]:
        for row in r["images"]:
            assert overlay_path(tmp_path / "a", r["method"], r["target"], row).is_file()
    assert main(_args_from_config(config, tmp_path / "b")) == 0
    again = json.loads((tmp_path / "b" / "report.json").read_text())
    assert again["config"] == config
    for r1, r2 in zip(report["results"], again["results"]):
        strip = [[{k: v for k, v in i.items() if k != "time_s"} for i in r["images"]]
                 for r in (r1, r2)]
        assert strip[0] == strip[1]


@pytest.mark.parametrize("change, words", [
    (["--norm", "mix:2"], "weight must be in [0, 1]"),
    (["--methods", "grata@mix:0.2,grata@mix:0.20"], "are the same"),
    (["--norm", "sample", "--methods", "grata,grata@sample"], "are the same"),
    (["--methods", "source@mix:0.2"], "always uses source"),
    (["--methods", "grata+gat"], "unknown suffix"),
    (["--methods", "grata@mix:0.2", "--hp", "grata@mix:0.5.beta=1"], "not in this run"),
])
def test_statistics_mistakes_are_one_line(tiny, tmp_path, capsys, change, words):
    rc = main(adapt_args(tiny, tmp_path / "run", *change))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and words in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "report.json").exists()


def test_old_flag_spelling_still_works(tiny, tmp_path):
    args = adapt_args(tiny, tmp_path / "run", "--methods", "bn")
    args[args.index("--engine")] = "--backend"
    assert main(args) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["engine"] == "torch"


def test_gated_spec_records_each_decision(tiny, tmp_path):
    rc = main(adapt_args(tiny, tmp_path / "g", "--targets", TARGET_DOMAINS[0],
                         "--methods", "bn,bn+gate,source", "--norm", "sample"))
    assert rc == 0
    report = json.loads((tmp_path / "g" / "report.json").read_text())
    rows = {r["method"]: r["images"] for r in report["results"]}
    assert report["config"]["gate"]["extra_forwards_per_image"] == 3
    assert report["config"]["norms"]["bn+gate"] == "sample"
    for plain, gated, src in zip(rows["bn"], rows["bn+gate"], rows["source"]):
        assert gated["gate"] in ("adapted", "source") and gated["gate_reason"]
        # the gated row scores the prediction it chose: bn's or the source model's
        chosen = plain if gated["gate"] == "adapted" else src
        assert gated["dice_mean"] == chosen["dice_mean"]
        assert "gate" not in plain


def test_gate_leaves_a_stream_rule_as_it_would_be(tiny):
    """With ema the gate's extra passes must not move the stream statistics: the gated
    runner's adapted predictions and statistics equal the plain runner's."""
    from grata.adapt import Runner
    from grata.domains import Skipped, stream_domain
    from grata.engine_chooser import engine_factory
    from grata.specs import parse_spec
    factory = engine_factory("torch", checkpoint=tiny / "edge.pt", arch="edge", device="cpu")
    plain = Runner(parse_spec("tent@ema:0.3"), factory(), 0, {})
    gated = Runner(parse_spec("tent@ema:0.3+gate"), factory(), 0, {})
    n = 0
    for item in stream_domain(tiny / "data", TARGET_DOMAINS[0], 64):
        if isinstance(item, Skipped):
            continue
        lp, _ = plain.adapt(plain.engine.to_input(item.image), item.image)
        _, decision = gated.adapt(gated.engine.to_input(item.image), item.image)
        np.testing.assert_allclose(gated.pair[0], lp, rtol=0, atol=1e-5)
        np.testing.assert_allclose(gated.engine.to_numpy(gated.engine.stats),
                                   plain.engine.to_numpy(plain.engine.stats), rtol=1e-6,
                                   atol=1e-7)
        assert decision["chosen"] in ("adapted", "source")
        n += 1
    assert n == 3
    assert not np.allclose(plain.engine.to_numpy(plain.engine.stats),
                           plain.engine.to_numpy(plain.engine.stats0))

"""The product defaults (grata.product) do no harm where the paper's setting does.

A seeded stream the defaults were not chosen on (generator seed 7, not the sweep's 0; the
first 8 images of each target), the shipped model, the product methods with the product
statistics and step sizes behind the disc-scale stage through `grata.adapt.run` as `grata
adapt` calls it: no target more than 1 Dice point below the source model behind the same
stage. The paper's setting (per-image statistics, beta 1e-4, crops as given) on the same
stream loses more than that on the crops at another scale, and so do the product's own
statistics without the scale stage: the test shows the failure, why the scale comes
first, and the cure.
"""

import numpy as np
import pytest

from grata import defaults, product
from grata.adapt import run
from grata.engine_chooser import engine_factory
from grata.methods import create
from grata.methods.grata import GraTa
from grata.methods.tent import Tent
from grata.models import load_checkpoint
from grata.norm import NormSpec
from grata.synth import generate

TARGETS = ["Handheld", "LowLight", "WideCrop", "TightCrop"]
N_IMAGES = 8
SEED = 7


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    root = tmp_path_factory.mktemp("product") / "data"
    # Every target gets its first 8 images (the train split streams first).
    generate(root, seed=SEED, n_source=(0, 0), n_target=(N_IMAGES, 0),
             progress=False)
    return root


def _model():
    return load_checkpoint(defaults.checkpoint(), defaults.DEFAULT_ARCH)


def _dice(results) -> dict:
    return {(r.method, r.target): r.summary()["dice_mean"] for r in results}


def test_product_values_are_valid_and_the_paper_stays_the_constructor_default():
    assert NormSpec(product.PRODUCT_NORM) == product.PRODUCT_NORM  # canonical spec
    assert product.PRODUCT_SCALE in ("auto", "none")
    assert set(product.PRODUCT_HP) <= {"grata", "tent"}
    for name, hp in product.PRODUCT_HP.items():
        method = create(name, _model(), norm=product.PRODUCT_NORM, **hp)
        assert method.norm == product.PRODUCT_NORM
    assert product.SERVE_METHOD in product.PRODUCT_METHODS
    # The paper's setting is what the constructors give without the product values.
    paper = create("grata", _model(), norm="sample")
    assert paper.beta == 1e-4 and paper.norm == "sample"
    assert GraTa.__init__.__defaults__[0] == 1e-4 and Tent.__init__.__defaults__[0] == 1e-4


@pytest.mark.slow
def test_product_default_does_no_harm_where_the_paper_setting_does(stream):
    methods = [m for m in product.PRODUCT_METHODS if m != "source"]
    hp = product.hyperparameters(methods)
    assert product.PRODUCT_SCALE == "auto"
    engines = engine_factory("torch", checkpoint=defaults.checkpoint(),
                             arch=defaults.DEFAULT_ARCH, device="cpu")
    got = _dice(run(engines, stream, TARGETS, defaults.DEFAULT_SIZE, ["source", *methods],
                    seed=0, progress=False, hyperparameters=hp, norm=product.PRODUCT_NORM,
                    scale=defaults.disc_scale()))
    # The paper's run differs from the product's grata by the rule, `beta` and the
    # scale stage; the harm below shows they reach the method through adapt.run. Each
    # is compared with the source on crops as given (scored at the model's size).
    paper = _dice(run(engines, stream, TARGETS, defaults.DEFAULT_SIZE,
                      ["source", "grata", f"bn@{product.PRODUCT_NORM}"], seed=0,
                      progress=False, hyperparameters={"grata": {"beta": 1e-4}},
                      norm="sample"))
    for t in TARGETS:
        for m in methods:
            assert got[(m, t)] >= got[("source", t)] - 1.0, (m, t, got)
    mean = {m: np.mean([got[(m, t)] for t in TARGETS]) for m in ["source", *methods]}
    assert all(mean[m] > mean["source"] for m in methods), mean
    harmed = [t for t in TARGETS if paper[("grata", t)] < paper[("source", t)] - 1.0]
    assert {"WideCrop", "TightCrop"} <= set(harmed), paper
    # The product's statistics on crops at another scale, without the stage: harm.
    unscaled = f"bn@{product.PRODUCT_NORM}"
    assert paper[(unscaled, "TightCrop")] < paper[("source", "TightCrop")] - 1.0, paper

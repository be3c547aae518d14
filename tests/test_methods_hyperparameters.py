"""Hyperparameters: --hp items and TOML tables, checked against each method's constructor."""

import sys

import pytest

from grata.errors import GrataError
from grata.methods import METHODS, create, resolved_hyperparameters
from grata.methods.hyperparameters import defaults_of
from grata.specs import parse_specs, spec_hyperparameters


def parse_hp(items, methods, config=None):
    """--hp items and a config file for a run of plain method names."""
    return spec_hyperparameters(parse_specs(methods), items, config)


def test_defaults_come_from_the_constructors():
    assert defaults_of(METHODS["grata"]) == {"beta": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8}
    assert defaults_of(METHODS["grata-noalign"]) == defaults_of(METHODS["grata"])
    assert defaults_of(METHODS["tent"]) == {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8}
    assert defaults_of(METHODS["source"]) == {} == defaults_of(METHODS["bn"])


def test_items_are_parsed_as_the_defaults_types():
    hp = parse_hp(["grata.beta=1e-3", "tent.betas=0.8, 0.99", "tent.lr=2e-4"],
                  ["bn", "tent", "grata"])
    assert hp == {"bn": {}, "tent": {"lr": 2e-4, "betas": (0.8, 0.99), "eps": 1e-8},
                  "grata": {"beta": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}}
    assert isinstance(hp["grata"]["beta"], float)


@pytest.mark.parametrize("item, words", [
    ("grata.bet=1e-3", "grata has no hyperparameter 'bet'"),
    ("tent.lr=2e-4", "method 'tent' is not in this run"),
    ("grata.beta=fast", "not a float"),
    ("grata.betas=0.9", "expected 2 comma-separated values"),
    ("beta=1e-3", "write METHOD.NAME=VALUE"),
])
def test_mistakes_are_one_line(item, words):
    with pytest.raises(GrataError, match=words) as info:
        parse_hp([item], ["grata"])
    assert "\n" not in str(info.value)


def test_unknown_method_is_refused():
    with pytest.raises(GrataError, match="unknown method 'gratta'"):
        resolved_hyperparameters("gratta")


@pytest.mark.skipif(sys.version_info < (3, 11) and __import__("importlib").util.find_spec(
    "tomli") is None, reason="TOML needs Python 3.11 or tomli")
def test_toml_tables_and_items_on_top(tmp_path):
    cfg = tmp_path / "hp.toml"
    cfg.write_text("[grata]\nbeta = 2e-3\nbetas = [0.5, 0.6]\n[tent]\nlr = 3e-4\n")
    hp = parse_hp(["grata.beta=5e-3"], ["tent", "grata"], cfg)
    assert hp["grata"] == {"beta": 5e-3, "betas": (0.5, 0.6), "eps": 1e-8}
    assert hp["tent"]["lr"] == 3e-4
    cfg.write_text("[grata\n")
    with pytest.raises(GrataError, match="not valid TOML"):
        parse_hp([], ["grata"], cfg)


def test_resolved_values_reach_the_method(edge64):
    from grata.runtime import OrtEngine
    hp = parse_hp(["grata.beta=1e-3", "grata.betas=0.8,0.9"], ["grata"])["grata"]
    m = create("grata", OrtEngine(edge64[1], threads=1), **hp)
    assert m.beta == 1e-3 and m.betas == (0.8, 0.9) and m.eps == 1e-8

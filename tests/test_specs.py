"""Method specs of a run: METHOD[@RULE][+gate], their keys and hyperparameters."""

import pytest

from grata.errors import GrataError
from grata.specs import parse_spec, parse_specs, spec_hyperparameters, split_specs


def test_split_keeps_commas_inside_a_rule():
    assert split_specs("grata@ema:0.1,0.5,tent@ema:0.1,n8+gate, bn,source") == \
        ["grata@ema:0.1,0.5", "tent@ema:0.1,n8+gate", "bn", "source"]
    assert split_specs("source,magic") == ["source", "magic"]


def test_keys_and_rules():
    s = parse_spec("grata@mix:0.20", "sample")
    assert (s.key, s.method, str(s.norm), s.gate) == ("grata@mix:0.2", "grata", "mix:0.2", False)
    s = parse_spec("tent", "ema:0.1")
    assert (s.key, str(s.norm)) == ("tent", "ema:0.1")
    s = parse_spec("bn@sample+gate", "source")
    assert (s.key, str(s.norm), s.gate) == ("bn@sample+gate", "sample", True)
    s = parse_spec("source", "mix:0.2")
    assert (s.key, str(s.norm)) == ("source", "source")
    # the same method with and without the gate are two specs
    assert [x.key for x in parse_specs(["bn", "bn+gate"])] == ["bn", "bn+gate"]
    with pytest.raises(GrataError, match="are the same"):
        parse_specs(["grata@mix:0.2", "grata@mix:0.20"])


def test_hyperparameters_by_method_and_by_spec():
    specs = parse_specs(["grata@sample", "grata@mix:0.3", "tent"])
    hp = spec_hyperparameters(specs, ["grata.beta=0.05", "grata@mix:0.30.beta=0.5",
                                      "tent.lr=2e-4"])
    assert hp["grata@sample"]["beta"] == 0.05 and hp["grata@mix:0.3"]["beta"] == 0.5
    assert hp["tent"]["lr"] == 2e-4
    with pytest.raises(GrataError, match="not in this run"):
        spec_hyperparameters(specs, ["bn.x=1"])
    with pytest.raises(GrataError, match="has no hyperparameter"):
        spec_hyperparameters(specs, ["grata@sample.bta=1"])

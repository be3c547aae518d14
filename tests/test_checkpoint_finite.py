"""A checkpoint with a NaN or infinite value (or a negative BN variance) is refused by
load_checkpoint, by export (from a file or a model) and by the CLI, in one line."""

from __future__ import annotations

import pytest
import torch
from grata.export import export_artifacts

from grata.cli import main
from grata.errors import GrataError
from grata.models import ResUnet, load_checkpoint


def _state(key, value):
    torch.manual_seed(0)
    state = ResUnet("edge").state_dict()
    flat = state[key].view(-1)
    flat[len(flat) // 2] = value
    return state


CASES = [("res.layer2.0.conv1.weight", float("nan"), "NaN or infinite"),
         ("up5.bias", float("inf"), "NaN or infinite"),
         ("res.bn1.weight", float("-inf"), "NaN or infinite"),
         ("bnout.running_mean", float("nan"), "NaN or infinite"),
         ("res.layer1.0.bn2.running_var", -1.0, "negative variance")]


@pytest.mark.parametrize("key, value, words", CASES)
def test_non_finite_checkpoint_is_refused(tmp_path, capsys, key, value, words):
    path = tmp_path / "bad.pt"
    torch.save(_state(key, value), path)
    with pytest.raises(GrataError) as err:
        load_checkpoint(path, "edge")
    msg = str(err.value)
    assert "\n" not in msg and key in msg and words in msg and "bad.pt" in msg
    with pytest.raises(GrataError, match=words):
        export_artifacts(path, "edge", 64, tmp_path / "art")
    model = ResUnet("edge")
    with torch.no_grad():  # an in-memory model is checked too
        dict(model.state_dict(keep_vars=True))[key].view(-1)[0] = value
    with pytest.raises(GrataError, match=words):
        export_artifacts(model, "edge", 64, tmp_path / "art")
    assert not (tmp_path / "art").exists()
    rc = main(["export", "--checkpoint", str(path), "--arch", "edge", "--size", "64",
               "--out", str(tmp_path / "art")])
    err_text = capsys.readouterr().err.strip()
    assert rc == 2 and len(err_text.splitlines()) == 1 and key in err_text


def test_finite_checkpoint_still_loads(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save(_state("up5.bias", 1e30), path)  # large but finite
    assert float(load_checkpoint(path, "edge").up5.bias.detach().abs().max()) == pytest.approx(1e30)

"""Source training: train split only, resumable, the same result either way."""

import hashlib

import pytest
import torch

from grata.domains import domain_entries
from grata.errors import GrataError
from grata.models import load_checkpoint
from grata.synth import SOURCE_DOMAIN, generate
from grata.train import load_split, train_source


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "data"
    generate(root, seed=2, n_source=(4, 3), n_target=(1, 1), size=96, progress=False)
    return root


def test_training_reads_the_train_split_only(data):
    images, _, skipped = load_split(data, SOURCE_DOMAIN, 64)
    train, _ = domain_entries(data, SOURCE_DOMAIN, splits=("train",))
    everything, _ = domain_entries(data, SOURCE_DOMAIN)
    assert len(images) == len(train) == 4 and len(everything) == 7
    assert all("/train/" in e.name for e in train) and not skipped


def test_interrupted_training_resumes_to_the_same_checkpoint(data, tmp_path, monkeypatch):
    from grata import train
    kw = {"batch": 2, "lr": 1e-3, "seed": 0, "progress": False, "threads": 1}
    full = train_source(data, SOURCE_DOMAIN, "edge", 64, 3, tmp_path / "full.pt", **kw)
    assert full["sha256"] == hashlib.sha256((tmp_path / "full.pt").read_bytes()).hexdigest()
    assert not (tmp_path / "full.pt.state.pt").exists()  # removed after a finished run

    calls = {"n": 0}
    real = train.augment_batch

    def crash_in_third_epoch(*args):
        calls["n"] += 1
        if calls["n"] == 5:  # 2 batches an epoch: the first batch of epoch 3
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train, "augment_batch", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_source(data, SOURCE_DOMAIN, "edge", 64, 3, tmp_path / "part.pt", **kw)
    assert (tmp_path / "part.pt.state.pt").exists() and not (tmp_path / "part.pt").exists()
    resumed_batches = []

    def count(*args):
        resumed_batches.append(1)
        return real(*args)

    monkeypatch.setattr(train, "augment_batch", count)
    train_source(data, SOURCE_DOMAIN, "edge", 64, 3, tmp_path / "part.pt", **kw)
    assert len(resumed_batches) == 2  # only epoch 3 ran again
    # Same weights as the uninterrupted run (the files differ: torch names the archive
    # inside after the file).
    a = torch.load(tmp_path / "full.pt", weights_only=True)
    b = torch.load(tmp_path / "part.pt", weights_only=True)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    model = load_checkpoint(tmp_path / "part.pt", "edge")
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_resume_state_of_another_configuration_is_refused(data, tmp_path):
    kw = {"batch": 2, "lr": 1e-3, "seed": 0, "progress": False, "threads": 1}
    out = tmp_path / "m.pt"
    state = out.with_name(out.name + ".state.pt")
    torch.save({"config": ["Other", "edge", 64, 3, 2, 1e-3, 0], "model": {}, "optim": {},
                "gen": torch.Generator().get_state(), "epoch": 1, "history": []}, state)
    with pytest.raises(GrataError, match="another configuration"):
        train_source(data, SOURCE_DOMAIN, "edge", 64, 3, out, **kw)


def test_training_keeps_the_disc_scale_beside_the_checkpoint(data, tmp_path, capsys):
    from grata.cli import main
    from grata.disc_scale import measure_disc_scale, read_sidecar
    out = tmp_path / "m.pt"
    info = train_source(data, SOURCE_DOMAIN, "edge", 64, 1, out, batch=2, progress=False,
                        threads=1)
    _, targets, _ = load_split(data, SOURCE_DOMAIN, 64)
    expected = measure_disc_scale(targets)  # the training masks as the model saw them
    assert expected.n == 4 and 0.2 < expected.diameter < 0.5
    assert read_sidecar(out) == info["disc_scale"] == expected
    # measured again for a checkpoint that lacks it, without training
    (tmp_path / "m.pt.scale.json").unlink()
    before = out.read_bytes()
    assert main(["train-source", "--data", str(data), "--domain", SOURCE_DOMAIN,
                 "--size", "64", "--scale-only", "--out", str(out)]) == 0
    assert read_sidecar(out) == expected and out.read_bytes() == before
    assert "m.pt.scale.json" in capsys.readouterr().out

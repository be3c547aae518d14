"""The network: the authors' key layout, BN statistics modes, checkpoint I/O."""

import pytest
import torch

from grata.errors import GrataError
from grata.models import (
    ResUnet,
    flatten_theta,
    load_checkpoint,
    norm_layers,
    save_checkpoint,
    set_norm_mode,
    theta_layout,
)


def authors_layout(blocks=(3, 4, 6, 3), widths=(64, 128, 256, 512)) -> dict[str, tuple]:
    """Key -> shape of the authors' ResUnet-34, written out from the specification."""
    keys = {}

    def bn(prefix, c):
        for k in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{k}"] = (c,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    keys["res.conv1.weight"] = (64, 3, 7, 7)
    bn("res.bn1", 64)
    cin = 64
    for li, (n, w) in enumerate(zip(blocks, widths), start=1):
        for b in range(n):
            p = f"res.layer{li}.{b}"
            keys[f"{p}.conv1.weight"] = (w, cin if b == 0 else w, 3, 3)
            bn(f"{p}.bn1", w)
            keys[f"{p}.conv2.weight"] = (w, w, 3, 3)
            bn(f"{p}.bn2", w)
            if b == 0 and li > 1:
                keys[f"{p}.downsample.0.weight"] = (w, cin, 1, 1)
                bn(f"{p}.downsample.1", w)
        cin = w
    keys["res.fc.weight"] = (1000, 512)
    keys["res.fc.bias"] = (1000,)
    for name, up_in, skip in (("up1", 512, 256), ("up2", 256, 128), ("up3", 256, 64),
                              ("up4", 256, 64)):
        keys[f"{name}.tr_conv.weight"] = (up_in, 128, 2, 2)
        keys[f"{name}.tr_conv.bias"] = (128,)
        keys[f"{name}.x_conv.weight"] = (128, skip, 1, 1)
        keys[f"{name}.x_conv.bias"] = (128,)
        bn(f"{name}.bn", 256)
    keys["up5.weight"] = (256, 32, 2, 2)
    keys["up5.bias"] = (32,)
    bn("bnout", 32)
    keys["seg_head.weight"] = (2, 32, 1, 1)
    keys["seg_head.bias"] = (2,)
    return keys


def authors_checkpoint(path, aux=True):
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in authors_layout().items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        else:
            state[k] = torch.randn(shape, generator=g) * 0.05
    if aux:
        state["recon1.weight"] = torch.randn(4, 4)
        state["rotate_head.0.weight"] = torch.randn(4, 2)
        state["denoise_up.bias"] = torch.randn(3)
    torch.save(state, path)
    return state


def test_resnet34_matches_the_authors_layout_key_for_key():
    model = ResUnet("resnet34")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == authors_layout()


def test_bn_count_and_theta_size_of_resnet34():
    model = ResUnet("resnet34")
    assert len(norm_layers(model)) == 41
    layout = theta_layout(model)
    assert layout[-1]["offset"] + layout[-1]["shape"][0] == 19136
    assert layout[0]["name"] == "res.bn1.weight" and layout[1]["name"] == "res.bn1.bias"


def test_authors_checkpoint_loads_reports_aux_keys_and_runs(tmp_path, caplog):
    state = authors_checkpoint(tmp_path / "authors.pt")
    model = load_checkpoint(tmp_path / "authors.pt", "resnet34")
    assert sorted(model.ignored_keys) == ["denoise_up.bias", "recon1.weight",
                                          "rotate_head.0.weight"]
    assert "auxiliary" in caplog.text
    assert torch.equal(model.up3.bn.weight, state["up3.bn.weight"])
    assert torch.equal(model.res.fc.weight, state["res.fc.weight"])
    out = model(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 2, 64, 64) and torch.isfinite(out).all()


def test_checkpoint_with_module_prefix_loads(tmp_path):
    state = authors_checkpoint(tmp_path / "a.pt", aux=False)
    torch.save({"model": {"module." + k: v for k, v in state.items()}}, tmp_path / "b.pt")
    model = load_checkpoint(tmp_path / "b.pt", "resnet34")
    assert torch.equal(model.seg_head.bias, state["seg_head.bias"])


@pytest.mark.parametrize("mutate, words", [
    (lambda s: s.pop("up2.bn.weight"), "missing"),
    (lambda s: s.__setitem__("decoder.extra", torch.zeros(1)), "unexpected"),
    (lambda s: s.__setitem__("seg_head.weight", torch.zeros(3, 32, 1, 1)), "shape"),
])
def test_other_mismatches_are_clear_errors(tmp_path, mutate, words):
    state = authors_checkpoint(tmp_path / "a.pt")
    mutate(state)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(GrataError, match=words) as exc:
        load_checkpoint(tmp_path / "bad.pt", "resnet34")
    assert "\n" not in str(exc.value)


def test_wrong_arch_and_unreadable_file_are_clear_errors(tmp_path):
    authors_checkpoint(tmp_path / "a.pt")
    with pytest.raises(GrataError, match="does not match arch 'resnet18'"):
        load_checkpoint(tmp_path / "a.pt", "resnet18")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(GrataError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt", "resnet34")
    with pytest.raises(GrataError, match="not found"):
        load_checkpoint(tmp_path / "none.pt", "resnet34")


def test_save_then_load_round_trips_the_same_layout(tmp_path):
    model = ResUnet("edge")
    for p in model.parameters():
        p.data.normal_()
    save_checkpoint(model, tmp_path / "e.pt")
    raw = torch.load(tmp_path / "e.pt", weights_only=True)
    assert list(raw) == list(model.state_dict())
    again = load_checkpoint(tmp_path / "e.pt", "edge")
    x = torch.rand(1, 3, 64, 64)
    model.eval()
    assert torch.equal(model(x), again(x))


def test_sample_mode_equals_train_mode_bn_at_batch_one():
    torch.manual_seed(0)
    model = ResUnet("edge")
    for _, m in norm_layers(model):
        m.weight.data.normal_(1, 0.2)
        m.bias.data.normal_(0, 0.2)
        m.running_mean.normal_()  # stored stats must play no part
    x = torch.rand(1, 3, 96, 96, dtype=torch.float64)
    model.double()
    set_norm_mode(model, "train")
    model.train()
    reference = model(x)
    model.eval()
    set_norm_mode(model, "sample")
    torch.testing.assert_close(model(x), reference, rtol=1e-10, atol=1e-10)


def test_sample_mode_batch_equals_separate_passes():
    torch.manual_seed(1)
    model = ResUnet("edge").double()
    set_norm_mode(model, "sample")
    x = torch.rand(3, 3, 64, 64, dtype=torch.float64)
    batched = model(x)
    for i in range(3):
        torch.testing.assert_close(batched[i:i + 1], model(x[i:i + 1]), rtol=1e-10, atol=1e-10)


def test_flat_theta_is_the_model_parameters():
    model = ResUnet("edge")
    theta = flatten_theta(model)
    layout = theta_layout(model)
    entry = next(e for e in layout if e["name"] == "up2.bn.bias")
    theta[entry["offset"]] = 3.5
    assert model.up2.bn.bias[0].item() == 3.5
    assert torch.equal(model.state_dict()["up2.bn.bias"][0], torch.tensor(3.5))

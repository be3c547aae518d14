"""The ONNX artifacts: graph hygiene, manifest, shared weights, integrity checks, and
parity of loss/gradient/logits with torch autograd.

Parity is judged against a float64 torch reference: the ONNX error must be at most
3x the error of torch's own float32 computation. ReLU and max-pool make the functions
piecewise smooth, and float32 rounding flips a few near-zero ReLU inputs (and near-tied
pooling windows) in every run at these sizes; one flip moves the gradient by 1e-4..1e-3
relative, far above the rounding error. So each float32 run is compared with the
float64 reference *on the same branch*: torch float32 and the float64 reference
replay the ReLU masks and max-pool choices of the ONNX run (read from the graph's ReLU
outputs). What is left is rounding error, which is what the 3x bound is about.

One float32 run is one draw of that rounding error, and a gradient's error can rest on a
single element: a pre-activation that cancels (sum of |terms| hundreds of times its
value) feeding a BN channel with one active pixel, whose backward is steep in that pixel.
The error of such a pixel is whatever the roundings upstream add up to, for torch as for
onnxruntime, so one draw's error varies tenfold. A role whose first draw is above the
bound is judged again on typical errors: root mean squares over it and `REDRAWS` more
draws, each with the images moved by one float32 ulp per pixel at random (the same
function on the branch its own ONNX run takes, the roundings drawn anew), each against its
own float64 reference. A lowering that loses precision is above the bound in every draw.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from grata.export import export_artifacts, load_manifest
from grata.runtime.ort_session import session_options

import grata.models as gmodels
from grata.cli import main
from grata.errors import GrataError
from grata.losses import consistency_loss, entropy_loss, teacher_batch, teacher_target
from grata.models import (
    ResUnet,
    bn_parameters,
    count_parameters,
    flatten_theta,
    set_norm_mode,
    theta_layout,
)

ort = pytest.importorskip("onnxruntime")

ROLES = ("infer", "entropy_grad", "consistency_grad", "infer_source")
MIX_ROLES = ("infer_mix", "entropy_grad_mix", "consistency_grad_mix")
ALL_ROLES = ROLES + MIX_ROLES
FLOOR = 2.0 ** -22          # 4 float32 ulps, relative: the floor for exact-looking errors
REDRAWS = 5                 # further rounding draws for a role above the bound at its first


def _model(arch: str, seed: int = 0) -> ResUnet:
    torch.manual_seed(seed)
    model = ResUnet(arch)
    with torch.no_grad():  # running statistics that differ from the defaults
        for _, m in gmodels.norm_layers(model):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def edge():
    return _model("edge")


@pytest.fixture(scope="module")
def art64(tmp_path_factory, edge):
    out = tmp_path_factory.mktemp("art") / "edge64"
    manifest = export_artifacts(edge, "edge", 64, out)
    return out, manifest


# -- graph hygiene --------------------------------------------------------------------------
def test_graphs_standard_ops_opset_and_checker(art64):
    folder, manifest = art64
    for role in ALL_ROLES:
        path = folder / manifest["graphs"][role]
        model = onnx.load(str(path), load_external_data=False)
        domains = {node.domain for node in model.graph.node}
        assert domains <= {"", "ai.onnx"}, (role, domains)
        imports = {o.domain: o.version for o in model.opset_import}
        assert set(imports) <= {"", "ai.onnx"} and imports.get("", 0) >= 17, imports
        onnx.checker.check_model(str(path), full_check=True)


def _io(model):
    def shape(v):
        return [d.dim_value for d in v.type.tensor_type.shape.dim]
    return ({v.name: shape(v) for v in model.graph.input},
            {v.name: shape(v) for v in model.graph.output})


def test_io_names_and_shapes(art64):
    folder, manifest = art64
    n, s = manifest["n_theta"], 64
    want = {
        "infer": ({"image": [1, 3, s, s], "theta": [n]}, {"logits": [1, 2, s, s]}),
        "infer_source": ({"image": [1, 3, s, s], "theta": [n]}, {"logits": [1, 2, s, s]}),
        "entropy_grad": ({"image": [1, 3, s, s], "theta": [n]}, {"loss": [], "grad": [n]}),
        "consistency_grad": ({"image": [1, 3, s, s], "strong_image": [1, 3, s, s],
                              "theta": [n]}, {"loss": [], "grad": [n]}),
    }
    mixed = {"stats": [n], "alpha": [1]}
    want["infer_mix"] = ({**want["infer"][0], **mixed},
                         {"logits": [1, 2, s, s], "img_stats": [n]})
    for role in ("entropy_grad", "consistency_grad"):
        want[role + "_mix"] = ({**want[role][0], **mixed}, want[role][1])
    for role in ALL_ROLES:
        model = onnx.load(str(folder / manifest["graphs"][role]), load_external_data=False)
        assert _io(model) == want[role], role
        assert manifest["io"][role] == {"inputs": want[role][0], "outputs": want[role][1]}
        for v in list(model.graph.input) + list(model.graph.output):
            assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        # the run agrees with the declared shapes
    sess = ort.InferenceSession(str(folder / "entropy_grad.onnx"), session_options(1),
                                providers=["CPUExecutionProvider"])
    loss, grad = sess.run(None, {"image": np.zeros((1, 3, s, s), np.float32),
                                 "theta": np.load(folder / manifest["theta0"])})
    assert loss.shape == () and loss.dtype == np.float32 and grad.shape == (n,)


def test_manifest_fields(art64, edge):
    folder, manifest = art64
    assert manifest == json.loads((folder / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and type(manifest["format_version"]) is int
    assert (manifest["arch"], manifest["size"], manifest["opset"]) == ("edge", 64, 17)
    assert manifest["graphs"] == {r: f"{r}.onnx" for r in ALL_ROLES}
    assert manifest["norms"] == ["source", "sample", "mix", "ema"]
    assert manifest["params"] == theta_layout(edge)
    stats0 = np.load(folder / manifest["stats0"])  # running mean, then var, per BN layer
    assert stats0.dtype == np.float32 and stats0.shape == (manifest["n_theta"],)
    for e in manifest["params"]:
        layer, kind = e["name"].rsplit(".", 1)
        buf = edge.get_buffer(f"{layer}.running_{'mean' if kind == 'weight' else 'var'}")
        np.testing.assert_array_equal(stats0[e["offset"]:e["offset"] + e["shape"][0]],
                                      buf.numpy())
    theta0 = np.load(folder / manifest["theta0"])
    assert theta0.dtype == np.float32 and theta0.shape == (manifest["n_theta"],)
    ref = torch.cat([p.detach().reshape(-1) for p in bn_parameters(edge)]).numpy()
    np.testing.assert_array_equal(theta0, ref)
    assert set(manifest["versions"]) >= {"torch", "onnx", "grata"}
    assert manifest["versions"]["torch"] == torch.__version__
    others = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["sha256"]) == others
    import hashlib
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert load_manifest(folder) == manifest


def test_weights_stored_once(art64, edge):
    folder, manifest = art64
    weights = (folder / manifest["weights"]).read_bytes()
    state = edge.state_dict()
    where = {}
    for role in ALL_ROLES:
        model = onnx.load(str(folder / manifest["graphs"][role]), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                assert np.prod(t.dims) <= 4096, (role, t.name, list(t.dims))
                continue
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == manifest["weights"]
            key = (int(info["offset"]), int(info["length"]))
            assert where.setdefault(t.name, key) == key, f"{t.name} stored twice"
    # every conv weight/bias of the segmentation path and the BN running statistics
    # (for infer_source), exactly once, with its value; no BN gamma/beta (theta)
    bn = {n for n, _ in gmodels.norm_layers(edge)}
    flipped = {n for n in where if n.endswith(".flipT")}
    assert set(where) - flipped == {k for k in state if k.rsplit(".", 1)[0] not in bn
                                    or k.endswith(("running_mean", "running_var"))}
    # the input gradient's kernels of stride-1 convolutions: flip(W) with in/out swapped,
    # stored beside W, read by gradient graphs only
    # up5 (2x2 stride 2, transposed) is stored as the 1x1 convolution of the phase tail:
    # output channel 4 c + 2 a + b is kernel position (a, b) of channel c
    w5, b5 = state["up5.weight"], state["up5.bias"]
    phase = torch.zeros(4 * w5.shape[1], w5.shape[0], 1, 1)
    for c in range(w5.shape[1]):
        for a in range(2):
            for b in range(2):
                phase[4 * c + 2 * a + b, :, 0, 0] = w5[:, c, a, b]
    state = {**state, "up5.weight": phase, "up5.bias": b5.repeat_interleave(4)}
    modules = dict(edge.named_modules())
    assert flipped
    for name in flipped:
        conv = modules[name.removesuffix(".weight.flipT")]
        assert (isinstance(conv, torch.nn.Conv2d) and conv.stride == (1, 1)) \
            or name == "up5.weight.flipT", name
    expect = {**state, **{n: torch.flip(state[n.removesuffix(".flipT")], [2, 3])
                          .transpose(0, 1) for n in flipped}}
    for role in ("infer", "infer_source", "infer_mix"):
        model = onnx.load(str(folder / manifest["graphs"][role]), load_external_data=False)
        assert not flipped & {t.name for t in model.graph.initializer}, role
    spans = sorted(where.values())
    assert all(a[0] + a[1] <= b[0] for a, b in itertools.pairwise(spans))
    for name, (offset, length) in where.items():
        arr = np.frombuffer(weights, np.float32, length // 4, offset)
        np.testing.assert_array_equal(arr, expect[name].contiguous().numpy().ravel())
    param_bytes = 4 * count_parameters(edge)
    flipped_bytes = sum(4 * state[n.removesuffix(".flipT")].numel() for n in flipped)
    folder_bytes = sum(p.stat().st_size for p in folder.iterdir())
    assert folder_bytes < 1.5 * (param_bytes + flipped_bytes), (folder_bytes, param_bytes)


def test_opset_18_and_21_match_17(art64, edge, tmp_path):
    folder, manifest = art64
    rng = np.random.default_rng(3)
    feeds = {"image": rng.random((1, 3, 64, 64), dtype=np.float32),
             "strong_image": rng.random((1, 3, 64, 64), dtype=np.float32),
             "theta": np.load(folder / manifest["theta0"]) + 0.1}
    outs = {}
    for opset in (17, 18, 21):
        d = folder if opset == 17 else tmp_path / f"o{opset}"
        if opset != 17:
            assert export_artifacts(edge, "edge", 64, d, opset=opset)["opset"] == opset
        sess = ort.InferenceSession(str(d / "consistency_grad.onnx"), session_options(1),
                                    providers=["CPUExecutionProvider"])
        outs[opset] = sess.run(None, feeds)
    for opset in (18, 21):
        np.testing.assert_allclose(outs[opset][1], outs[17][1], rtol=1e-5, atol=1e-9)


def test_export_rejects_bad_requests(edge, tmp_path):
    for size in (100, 32):
        with pytest.raises(GrataError, match="multiple of 32"):
            export_artifacts(edge, "edge", size, tmp_path / "a")
    with pytest.raises(GrataError, match="opset"):
        export_artifacts(edge, "edge", 64, tmp_path / "a", opset=13)
    with pytest.raises(GrataError, match="not 'resnet34'"):
        export_artifacts(edge, "resnet34", 64, tmp_path / "a")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(GrataError, match="not an artifact folder"):
        export_artifacts(edge, "edge", 64, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_export_from_checkpoint_path(edge, tmp_path):
    ckpt = tmp_path / "edge.pt"
    torch.save(edge.state_dict(), ckpt)
    manifest = export_artifacts(ckpt, "edge", 64, tmp_path / "art")
    np.testing.assert_array_equal(np.load(tmp_path / "art" / manifest["theta0"]),
                                  torch.cat([p.detach().reshape(-1)
                                             for p in bn_parameters(edge)]).numpy())


# -- torch-free side ----------------------------------------------------------------------
def _expect_refusal(folder, what):
    with pytest.raises(GrataError) as err:
        load_manifest(folder)
    msg = str(err.value)
    assert "\n" not in msg and msg, msg
    return msg


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_load_manifest_refuses_changes(art64, tmp_path):
    src, _ = art64
    names = sorted(p.name for p in src.iterdir() if p.name != "manifest.json")
    for name in names:  # one changed byte anywhere in any listed file
        size = (src / name).stat().st_size
        for pos in (0, size // 2, size - 1):
            d = _copy(src, tmp_path / f"{name}_{pos}")
            data = bytearray((d / name).read_bytes())
            data[pos] ^= 0x01
            (d / name).write_bytes(bytes(data))
            assert name in _expect_refusal(d, f"{name}@{pos}")
    # one changed byte in the manifest's content (the JSON stays valid)
    text = (src / "manifest.json").read_text()
    edits = (('"edge"', '"edgE"'), ('"size": 64', '"size": 65'),
             ('"offset": 16', '"offset": 17'))
    for i, (old, new) in enumerate(edits):
        assert old in text
        d = _copy(src, tmp_path / f"manifest_{i}")
        (d / "manifest.json").write_text(text.replace(old, new, 1))
        assert "manifest.json" in _expect_refusal(d, new)
    d = _copy(src, tmp_path / "version")
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 2
    (d / "manifest.json").write_text(json.dumps(m))
    assert "format_version" in _expect_refusal(d, "version")
    for name in [*names, "manifest.json"]:
        d = _copy(src, tmp_path / f"missing_{name}")
        (d / name).unlink()
        msg = _expect_refusal(d, f"missing {name}")
        assert name in msg or "manifest.json" in msg
    d = _copy(src, tmp_path / "badjson")
    (d / "manifest.json").write_text("{not json")
    _expect_refusal(d, "bad json")
    # verify=False skips the hashes but still notices a missing file
    d = _copy(src, tmp_path / "noverify")
    (d / "weights.bin").write_bytes(b"\0" * 8)
    assert load_manifest(d, verify=False)["arch"] == "edge"
    (d / "weights.bin").unlink()
    with pytest.raises(GrataError):
        load_manifest(d, verify=False)


def _redigest(folder, manifest):
    """Write a manifest whose own digest holds again (an export that wrote these fields)."""
    from grata.export.manifest import _content_digest
    manifest["manifest_sha256"] = _content_digest(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_carries_the_disc_scale_and_older_ones_still_load(art64, edge, tmp_path):
    from grata.disc_scale import DiscScale, model_scale
    old_folder, old = art64  # exported without a scale, as every folder before the field
    assert "disc_scale" not in old and load_manifest(old_folder)["arch"] == "edge"
    scale, line = model_scale(load_manifest(old_folder))
    assert scale is None and "unknown" in line
    s = DiscScale(0.344, 0.297, 0.406, 0.064, 0.106, 80)
    manifest = export_artifacts(edge, "edge", 64, tmp_path / "art", disc_scale=s)
    assert manifest["disc_scale"] == s.to_json()
    loaded = load_manifest(tmp_path / "art")
    assert model_scale(loaded)[0] == s
    # the graphs do not depend on the scale: the same bytes as the folder without it
    for role, name in loaded["graphs"].items():
        assert loaded["sha256"][name] == old["sha256"][name], role
    d = _copy(tmp_path / "art", tmp_path / "bad")
    m = json.loads((d / "manifest.json").read_text())
    m["disc_scale"]["diameter"] = "big"
    _redigest(d, m)
    assert "disc_scale" in _expect_refusal(d, "bad scale")
    with pytest.raises(GrataError, match="DiscScale"):
        export_artifacts(edge, "edge", 64, tmp_path / "x", disc_scale={"diameter": 0.3})


def test_grata_export_writes_the_checkpoints_scale_or_the_flags(edge, tmp_path, capsys):
    from grata.disc_scale import DiscScale, write_sidecar
    ckpt = tmp_path / "e.pt"
    torch.save(edge.state_dict(), ckpt)
    args = ["export", "--checkpoint", str(ckpt), "--arch", "edge", "--size", "64", "--out"]
    assert main([*args, str(tmp_path / "none")]) == 0
    assert "disc_scale" not in load_manifest(tmp_path / "none")
    assert "disc scale: unknown" in capsys.readouterr().out
    s = DiscScale(0.3, 0.25, 0.36, 0.05, 0.1, 12)
    write_sidecar(ckpt, s)
    assert main([*args, str(tmp_path / "side")]) == 0
    assert load_manifest(tmp_path / "side")["disc_scale"] == s.to_json()
    assert main([*args, str(tmp_path / "flag"), "--disc-scale", "0.42"]) == 0
    assert load_manifest(tmp_path / "flag")["disc_scale"]["diameter"] == 0.42
    assert main([*args, str(tmp_path / "bad"), "--disc-scale", "7"]) == 2
    assert "--disc-scale" in capsys.readouterr().err


def test_the_artifact_cache_carries_the_checkpoints_scale(edge, tmp_path, monkeypatch):
    from grata.artifacts import cached_artifacts
    from grata.digest import file_sha256
    from grata.disc_scale import DiscScale, sidecar_path, write_sidecar
    monkeypatch.setenv("GRATA_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "e.pt"
    torch.save(edge.state_dict(), ckpt)
    s = DiscScale(0.3, 0.25, 0.36, 0.05, 0.1, 12)
    write_sidecar(ckpt, s)
    folder = cached_artifacts(ckpt, "edge", 64)
    assert load_manifest(folder)["disc_scale"] == s.to_json()
    # another sidecar is another folder: the key holds the sidecar's digest
    assert f"-s{file_sha256(sidecar_path(ckpt))[:8]}-" in folder.name


# -- parity with torch autograd -------------------------------------------------------------
class _TiedPool(torch.nn.Module):
    """BN, then max-pool over many exactly tied windows (integer-valued input)."""

    def __init__(self):
        super().__init__()
        self.bn = gmodels.Norm2d(2)

    def forward(self, x):
        return F.max_pool2d(self.bn(x[:, :2]), 3, 2, 1)


def test_max_pool_gradient_goes_to_the_first_maximum_only():
    from grata.export.exporter import _build_role

    tiny = _TiedPool()
    set_norm_mode(tiny, "sample")
    layout = theta_layout(tiny)
    b, inputs, outputs = _build_role(tiny, "entropy_grad", 16, 17, layout)
    proto = b.build("tied", inputs, outputs)
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), session_options(1),
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    image = rng.integers(0, 3, (1, 3, 16, 16)).astype(np.float32)
    theta = np.array([1.5, 0.7, 0.2, -0.3], np.float32)
    loss, grad = sess.run(None, {"image": image, "theta": theta})
    ref = copy.deepcopy(tiny).double()
    with torch.no_grad():
        flat = flatten_theta(ref)
        flat.copy_(torch.from_numpy(theta).double())
    ref_loss = entropy_loss(ref(torch.from_numpy(image).double()))
    ref_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ref_loss,
                                                                      bn_parameters(ref))])
    np.testing.assert_allclose(loss, ref_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad.numpy(), rtol=1e-4, atol=1e-7)


class _BranchF:
    """Stands in for `torch.nn.functional` inside `grata.models`: records the ReLU masks
    and max-pool choices of a run, or replays given ones (the reference on a branch)."""

    def __init__(self, masks=None, pools=None):
        self.record = masks is None
        self.masks, self.pools = ([], []) if self.record else (list(masks), list(pools))
        self.i = self.j = 0

    def __getattr__(self, name):
        return getattr(F, name)

    def relu(self, x, inplace=False):
        if self.record:
            out = F.relu(x)
            self.masks.append((out > 0).detach().cpu())
            return out
        mask = self.masks[self.i]
        self.i += 1
        return x * mask.to(x.dtype)

    def max_pool2d(self, x, kernel_size, stride=None, padding=0, **kw):
        if self.record:
            out, idx = F.max_pool2d(x, kernel_size, stride, padding, return_indices=True)
            self.pools.append(idx.detach().cpu())
            return out
        idx = self.pools[self.j]
        self.j += 1
        return x.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)

    def done(self):
        assert self.record or (self.i, self.j) == (len(self.masks), len(self.pools))


@contextmanager
def _branch(bf):
    saved = gmodels.F
    gmodels.F = bf
    try:
        yield bf
    finally:
        gmodels.F = saved
    bf.done()


class TorchRef:
    """The torch function of a graph role; with `alpha` and `stats` (flat, theta's
    layout) every BN layer runs in ``mix`` mode with those prior statistics."""

    def __init__(self, model, dtype, alpha=None, stats=None):
        self.dtype = dtype
        self.model = copy.deepcopy(model).to(dtype)
        set_norm_mode(self.model, "sample")
        self.flat = flatten_theta(self.model)
        self.params = bn_parameters(self.model)
        self.mixed = alpha is not None
        if self.mixed:
            s = torch.from_numpy(stats).to(dtype)
            layout = theta_layout(self.model)
            priors = [(s[w["offset"]:w["offset"] + w["shape"][0]],
                       s[b["offset"]:b["offset"] + b["shape"][0]])
                      for w, b in zip(layout[0::2], layout[1::2])]
            set_norm_mode(self.model, "mix", alpha, priors)

    def run(self, role, theta, image, strong, branch):
        role = role.removesuffix("_mix")
        with torch.no_grad():
            self.flat.copy_(torch.from_numpy(theta).to(self.dtype))
        x = torch.from_numpy(image).to(self.dtype)
        with _branch(branch):
            if role == "infer_source":
                set_norm_mode(self.model, "running")
                try:
                    with torch.no_grad():
                        return {"logits": self.model(x).double().numpy()}
                finally:
                    set_norm_mode(self.model, "sample")
            if role == "infer":
                with torch.no_grad():
                    out = {"logits": self.model(x).double().numpy()}
                if self.mixed:
                    out["img_stats"] = torch.cat(
                        [t[0] for _, m in gmodels.norm_layers(self.model)
                         for t in m.img_stats]).double().numpy()
                return out
            if role == "entropy_grad":
                loss = entropy_loss(self.model(x))
            else:
                with torch.no_grad():
                    target = teacher_target(self.model(teacher_batch(x)))
                xs = torch.from_numpy(strong).to(self.dtype)
                loss = consistency_loss(self.model(xs), target)
            grads = torch.autograd.grad(loss, self.params)
        grad = torch.cat([g.reshape(-1) for g in grads])
        return {"loss": np.array(loss.item()), "grad": grad.double().numpy()}


def _tapped_session(folder: Path, role: str, work: Path):
    """A session of the graph with every ReLU output (and each max-pool's input) exposed."""
    model = onnx.load(str(folder / f"{role}.onnx"), load_external_data=False)
    relus = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    pools = [(n.input[0], list(n.attribute)) for n in model.graph.node
             if n.op_type == "MaxPool"]
    for name in relus + [p for p, _ in pools]:
        if name not in [o.name for o in model.graph.output]:
            model.graph.output.append(onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "weights.bin", work / "weights.bin")
    onnx.save(model, str(work / f"{role}.onnx"))
    sess = ort.InferenceSession(str(work / f"{role}.onnx"), session_options(),
                                providers=["CPUExecutionProvider"])
    return sess, relus, pools


def _spatial(mask):
    """A mask of the phase tail ([N, C, 4 h, h]: each channel's four 2x2-block positions
    stacked) in the model's layout [N, C, 2 h, 2 h]; other masks as they are."""
    n, c, hh, w = mask.shape
    if hh != 4 * w:
        return mask
    return F.pixel_shuffle(mask.reshape(n, 4 * c, w, w).to(torch.uint8), 2).bool()


def _pool_attrs(attrs):
    a = {x.name: onnx.helper.get_attribute_value(x) for x in attrs}
    return a["kernel_shape"], a.get("strides", a["kernel_shape"]), a.get("pads", [0] * 4)[:2]


def _onnx_run(tapped, feeds):
    """Outputs of a `_tapped_session` run and the branch it took (ReLU masks, max-pool
    choices)."""
    sess, relus, pools = tapped
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, feeds)))
    masks = [_spatial(torch.from_numpy(values[r] > 0)) for r in relus]
    idx = []
    for name, attrs in pools:
        k, s, p = _pool_attrs(attrs)
        _, i = F.max_pool2d(torch.from_numpy(values[name]), list(k), list(s), list(p),
                            return_indices=True)
        idx.append(i)
    outs = {k: values[k].astype(np.float64) for k in ("logits", "loss", "grad", "img_stats")
            if k in values}
    return outs, (masks, idx)


def _rel(a, ref) -> float:
    return float(np.linalg.norm(np.asarray(a) - ref) / max(np.linalg.norm(ref), 1e-30))


def _within(e_onnx: float, e_torch: float) -> bool:
    return e_onnx <= 3 * e_torch + FLOOR


def _nudged(a: np.ndarray, rng) -> np.ndarray:
    """`a` (float32) with every element moved one ulp up or down at random."""
    away = np.where(rng.random(a.shape) < 0.5, -np.inf, np.inf).astype(a.dtype)
    return np.nextafter(a, away)


def _parity(model, arch, size, tmp_path, seed=0, alphas=None, folder=None):
    """Every role's outputs against torch on the same branch; with `alphas` the mixed
    graphs at each weight, fed prior statistics that differ from the stored ones (as a
    stream estimate would)."""
    if folder is None:
        folder = tmp_path / "art"
        export_artifacts(model, arch, size, folder)
    manifest = load_manifest(folder)
    rng = np.random.default_rng(seed)
    theta0 = np.load(folder / manifest["theta0"])
    theta = (theta0 + 0.2 * rng.standard_normal(theta0.size) * (np.abs(theta0) + 0.5))
    theta = theta.astype(np.float32)
    image = rng.random((1, 3, size, size), dtype=np.float32)
    strong = rng.random((1, 3, size, size), dtype=np.float32)
    if alphas is None:
        runs = [(None, ROLES)]
    else:
        stats = np.load(folder / manifest["stats0"]).astype(np.float64)
        noise = rng.standard_normal(stats.size)
        for e in manifest["params"]:  # means shift, variances scale (stay positive)
            sl = slice(e["offset"], e["offset"] + e["shape"][0])
            stats[sl] = stats[sl] + 0.2 * noise[sl] if e["name"].endswith(".weight") \
                else stats[sl] * np.exp(0.2 * noise[sl])
        stats = stats.astype(np.float32)
        runs = [(a, MIX_ROLES) for a in alphas]
    report, first = {}, {}
    for alpha, roles in runs:
        mixed = {} if alpha is None else {"stats": stats, "alpha": np.array([alpha], np.float32)}
        _parity_roles(model, folder, roles, theta, image, strong, mixed, tmp_path, report,
                      first, seed)
    bad = {k: v for k, v in report.items() if not _within(*v)}
    lines = "; ".join(f"{k}: onnx {a:.2e} torch {b:.2e}" + (
        f" (rms of {1 + REDRAWS} draws; first onnx {first[k][0]:.2e} torch {first[k][1]:.2e})"
        if k in first else "") for k, (a, b) in report.items())
    assert not bad, f"ONNX error above 3x torch float32's: {lines}"
    return report


def _parity_roles(model, folder, roles, theta, image, strong, mixed, tmp_path, report,
                  first, seed):
    """Each role's (ONNX error, torch float32 error) per output into `report`; for a role
    with an output above the bound, root mean squares over re-drawn roundings instead
    (and the first draw's errors into `first`)."""
    stats = mixed.get("stats")
    alpha = None if not mixed else float(mixed["alpha"][0])
    ref64 = TorchRef(model, torch.float64, alpha, stats)
    ref32 = TorchRef(model, torch.float32, alpha, stats)
    tag = "" if alpha is None else f"@{alpha:g}"
    for role in roles:
        tapped = _tapped_session(folder, role, tmp_path / (role + tag))

        def draw(image, strong):
            feeds = {"image": image, "theta": theta, **mixed}
            if role.startswith("consistency_grad"):
                feeds["strong_image"] = strong
            got, decisions = _onnx_run(tapped, feeds)
            # torch float32 and the float64 reference, both on the branch the ONNX run took
            t32 = ref32.run(role, theta, image, strong, _BranchF(*decisions))
            ref = ref64.run(role, theta, image, strong, _BranchF(*decisions))
            assert set(got) == set(ref), (role, sorted(got), sorted(ref))
            return {key: (_rel(value, ref[key]), _rel(t32[key], ref[key]))
                    for key, value in got.items()}

        errors = draw(image, strong)
        keys = {key: f"{role}{tag}.{key}" for key in errors}
        if all(_within(*e) for e in errors.values()):
            report.update({keys[k]: e for k, e in errors.items()})
            continue
        rng = np.random.default_rng([seed, len(report)])
        draws = [errors] + [draw(_nudged(image, rng), _nudged(strong, rng))
                            for _ in range(REDRAWS)]
        for key, name in keys.items():
            first[name] = errors[key]
            report[name] = tuple(float(np.sqrt(np.mean([d[key][i] ** 2 for d in draws])))
                                 for i in (0, 1))


@pytest.mark.parametrize("size", [128, 256])
def test_parity_edge(edge, size, tmp_path):
    assert len(_parity(edge, "edge", size, tmp_path, seed=size)) == 6


def test_parity_edge_mixed_statistics(edge, tmp_path):
    """The mixed graphs' loss, gradient, logits and image statistics at a = 0, 0.3, 1."""
    report = _parity(edge, "edge", 128, tmp_path, seed=5, alphas=(0.0, 0.3, 1.0))
    assert len(report) == 3 * 6


def test_mixed_graphs_at_one_and_zero_are_sample_and_source(art64):
    """a = 1 gives the sample graphs' results (entropy: bit for bit); a = 0 with the stored
    statistics gives infer_source's logits."""
    folder, manifest = art64
    sess = {r: ort.InferenceSession(str(folder / manifest["graphs"][r]), session_options(1),
                                    providers=["CPUExecutionProvider"]) for r in ALL_ROLES}
    rng = np.random.default_rng(9)
    theta = np.load(folder / manifest["theta0"]) + 0.1
    stats0 = np.load(folder / manifest["stats0"])
    image = rng.random((1, 3, 64, 64), dtype=np.float32)
    strong = rng.random((1, 3, 64, 64), dtype=np.float32)
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    base = {"image": image, "theta": theta}
    mix1 = {**base, "stats": stats0, "alpha": one}
    ent = sess["entropy_grad"].run(None, base)
    ent1 = sess["entropy_grad_mix"].run(None, mix1)
    np.testing.assert_array_equal(ent1[0], ent[0])
    np.testing.assert_array_equal(ent1[1], ent[1])
    con = sess["consistency_grad"].run(None, {**base, "strong_image": strong})
    con1 = sess["consistency_grad_mix"].run(None, {**mix1, "strong_image": strong})
    # (the sample graph's teacher runs InstanceNormalization: rounding differs slightly)
    np.testing.assert_allclose(con1[0], con[0], rtol=1e-6)
    np.testing.assert_allclose(con1[1], con[1], rtol=1e-4, atol=1e-6 * np.abs(con[1]).max())
    logits1, stats1 = sess["infer_mix"].run(None, mix1)
    np.testing.assert_allclose(logits1, sess["infer"].run(None, base)[0], rtol=1e-4, atol=1e-4)
    logits0, stats_zero = sess["infer_mix"].run(None, {**mix1, "alpha": zero})
    np.testing.assert_allclose(logits0, sess["infer_source"].run(None, base)[0],
                               rtol=1e-5, atol=1e-5)
    # the image statistics do not depend on the weight in the first BN layer
    c = manifest["params"][0]["shape"][0]
    np.testing.assert_array_equal(stats1[:2 * c], stats_zero[:2 * c])
    assert not np.allclose(logits0, logits1, atol=1e-2)  # the weight matters


@pytest.mark.slow
def test_parity_resnet34_128(tmp_path):
    """ResNet-34's 4 x 4 bottleneck: up1's BN sees 8 x 8 pixels, and on this input one of
    its channels has a single active pixel whose pre-activation cancels 569-fold; the entropy
    gradient's error is nearly all that pixel's, so one draw's ratio is chance. Measured
    (entropy_grad.grad) on an AVX2 + FMA CPU without AVX-512: first draw ONNX 1.76e-4,
    torch float32 2.34e-5 (7.5x; torch's scalar kernels, ATEN_CPU_CAPABILITY=default,
    1.95e-4 on the same draw: 0.9x); root mean square of six draws ONNX 8.6e-5, torch
    1.3e-4 (0.66x). (On the AVX-512 machine before it the first draw was within 3x.)"""
    _parity(_model("resnet34", 1), "resnet34", 128, tmp_path, seed=7)


def test_affine_batchnorms_are_exact_multiply_adds(art64):
    """Every BatchNormalization of the sample-statistics graphs is the per-channel affine
    map (mean 0, var + eps == 1 in float32), and onnxruntime runs it with the bits of
    x * scale + bias computed as two float32 roundings."""
    folder, manifest = art64
    found = 0
    for role in ("entropy_grad", "consistency_grad", "infer"):
        model = onnx.load(str(folder / manifest["graphs"][role]), load_external_data=False)
        consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
                  if t.data_location != onnx.TensorProto.EXTERNAL}
        for node in model.graph.node:
            if node.op_type != "BatchNormalization":
                continue
            found += 1
            eps = next(a.f for a in node.attribute if a.name == "epsilon")
            mean, var = consts[node.input[3]], consts[node.input[4]]
            assert not mean.any()
            assert np.all(var.astype(np.float32) + np.float32(eps) == np.float32(1))
    assert found
    rng = np.random.default_rng(0)
    c = 16
    x = rng.standard_normal((1, c, 64, 64)).astype(np.float32) * 3
    g, b = rng.standard_normal((2, c)).astype(np.float32)
    node = onnx.helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"],
                                 epsilon=eps)
    graph = onnx.helper.make_graph(
        [node], "affine", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                              list(x.shape))],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(a, n) for a, n in
         ((g, "g"), (b, "b"), (mean[:1].repeat(c), "m"), (var[:1].repeat(c), "v"))])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    y = ort.InferenceSession(proto.SerializeToString(), session_options(1),
                             providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expect = (x * g[None, :, None, None]).astype(np.float32) + b[None, :, None, None]
    np.testing.assert_array_equal(y, expect)

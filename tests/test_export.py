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
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from grata.export import export_artifacts, load_manifest, session_options

import grata.models as gmodels
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
FLOOR = 2.0 ** -22          # 4 float32 ulps, relative: the floor for exact-looking errors


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
    for role in ROLES:
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
    for role in ROLES:
        model = onnx.load(str(folder / manifest["graphs"][role]), load_external_data=False)
        assert _io(model) == want[role], role
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
    assert manifest["graphs"] == {r: f"{r}.onnx" for r in ROLES}
    assert manifest["params"] == theta_layout(edge)
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
    for role in ROLES:
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
    assert set(where) == {k for k in state if k.rsplit(".", 1)[0] not in bn
                          or k.endswith(("running_mean", "running_var"))}
    spans = sorted(where.values())
    assert all(a[0] + a[1] <= b[0] for a, b in itertools.pairwise(spans))
    for name, (offset, length) in where.items():
        arr = np.frombuffer(weights, np.float32, length // 4, offset)
        np.testing.assert_array_equal(arr, state[name].numpy().ravel())
    param_bytes = 4 * count_parameters(edge)
    folder_bytes = sum(p.stat().st_size for p in folder.iterdir())
    assert folder_bytes < 1.5 * param_bytes, (folder_bytes, param_bytes)


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
def test_manifest_and_session_options_do_not_import_torch():
    code = ("import sys; import grata.export as e; from grata.export import manifest, session;"
            "o = e.session_options(3); "
            "assert o.intra_op_num_threads == 3 and not o.enable_cpu_mem_arena;"
            "assert not o.enable_mem_pattern;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _physical_cores_capped() -> int:
    import os
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(),
                       (topo / "core_id").read_text().strip()))
        except OSError:
            return len(os.sched_getaffinity(0))
    n = len(cores)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


def test_session_options_defaults():
    opts = session_options()
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # the default is the physical cores capped by a cgroup quota, both read here directly
    assert opts.intra_op_num_threads == _physical_cores_capped()
    assert session_options(2).intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    assert not opts.enable_cpu_mem_arena and not opts.enable_mem_pattern


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
    def __init__(self, model, dtype):
        self.dtype = dtype
        self.model = copy.deepcopy(model).to(dtype)
        set_norm_mode(self.model, "sample")
        self.flat = flatten_theta(self.model)
        self.params = bn_parameters(self.model)

    def run(self, role, theta, image, strong, branch):
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
                    return {"logits": self.model(x).double().numpy()}
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


def _pool_attrs(attrs):
    a = {x.name: onnx.helper.get_attribute_value(x) for x in attrs}
    return a["kernel_shape"], a.get("strides", a["kernel_shape"]), a.get("pads", [0] * 4)[:2]


def _onnx_run(folder, role, feeds, work):
    sess, relus, pools = _tapped_session(folder, role, work)
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, feeds)))
    masks = [torch.from_numpy(values[r] > 0) for r in relus]
    idx = []
    for name, attrs in pools:
        k, s, p = _pool_attrs(attrs)
        _, i = F.max_pool2d(torch.from_numpy(values[name]), list(k), list(s), list(p),
                            return_indices=True)
        idx.append(i)
    outs = {k: values[k].astype(np.float64) for k in ("logits", "loss", "grad") if k in values}
    return outs, (masks, idx)


def _rel(a, ref) -> float:
    return float(np.linalg.norm(np.asarray(a) - ref) / max(np.linalg.norm(ref), 1e-30))


def _parity(model, arch, size, tmp_path, seed=0):
    folder = tmp_path / "art"
    manifest = export_artifacts(model, arch, size, folder)
    rng = np.random.default_rng(seed)
    theta0 = np.load(folder / manifest["theta0"])
    theta = (theta0 + 0.2 * rng.standard_normal(theta0.size) * (np.abs(theta0) + 0.5))
    theta = theta.astype(np.float32)
    image = rng.random((1, 3, size, size), dtype=np.float32)
    strong = rng.random((1, 3, size, size), dtype=np.float32)
    ref64, ref32 = TorchRef(model, torch.float64), TorchRef(model, torch.float32)
    report = {}
    for role in ROLES:
        feeds = {"image": image, "theta": theta}
        if role == "consistency_grad":
            feeds["strong_image"] = strong
        got, decisions = _onnx_run(folder, role, feeds, tmp_path / role)
        # torch float32 and the float64 reference, both on the branch the ONNX run took
        t32 = ref32.run(role, theta, image, strong, _BranchF(*decisions))
        ref = ref64.run(role, theta, image, strong, _BranchF(*decisions))
        for key, value in got.items():
            e_onnx, e_torch = _rel(value, ref[key]), _rel(t32[key], ref[key])
            report[f"{role}.{key}"] = (e_onnx, e_torch)
    bad = {k: v for k, v in report.items() if not v[0] <= 3 * v[1] + FLOOR}
    lines = "; ".join(f"{k}: onnx {a:.2e} torch {b:.2e}" for k, (a, b) in report.items())
    assert not bad, f"ONNX error above 3x torch float32's: {lines}"
    assert len(report) == 6
    return report


@pytest.mark.parametrize("size", [128, 256])
def test_parity_edge(edge, size, tmp_path):
    _parity(edge, "edge", size, tmp_path, seed=size)


@pytest.mark.slow
def test_parity_resnet34_128(tmp_path):
    _parity(_model("resnet34", 1), "resnet34", 128, tmp_path, seed=7)

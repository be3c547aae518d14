"""Export a ResUnet to the GraTa artifact folder (imports torch; load it lazily).

Folder layout::

    manifest.json          see `grata.export.manifest`
    infer.onnx             (image, theta) -> logits
    entropy_grad.onnx      (image, theta) -> (loss, grad)
    consistency_grad.onnx  (image, strong_image, theta) -> (loss, grad)
    infer_source.onnx      (image, theta) -> logits with the stored BN statistics
    infer_mix.onnx, entropy_grad_mix.onnx, consistency_grad_mix.onnx
                           the same three with mixed BN statistics: extra inputs
                           stats [n] and alpha [1]; infer_mix also outputs img_stats [n]
    weights.bin            frozen weights (convolutions, BN running statistics, the
                           backward's flipped kernels), once for all graphs
    theta0.npy             the source theta (float32, theta's layout)
    stats0.npy             the stored running statistics (float32, theta's layout: each
                           BN layer's means, then its variances)
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto
from torch import nn

import grata
from grata.disc_scale import DiscScale
from grata.errors import GrataError
from grata.models import (
    ResUnet,
    bn_parameters,
    load_checkpoint,
    norm_layers,
    set_norm_mode,
    theta_layout,
)

from grata.export.builder import FLIPPED, GraphBuilder
from grata.export.manifest import write_manifest
from grata.export.output import check_out_folder, replace_folder_atomically
from grata.export.trace import INPUTS, MIX_ROLES, ROLES, TEACHER_VIEWS, check_teacher_views, trace

MIN_OPSET = 17
MAX_OPSET = 21
WEIGHTS = "weights.bin"
THETA0 = "theta0.npy"
STATS0 = "stats0.npy"
NORMS = ["source", "sample", "mix", "ema"]  # the statistics choices these graphs serve
GRAPH_FILES = {role: f"{role}.onnx" for role in (*ROLES, *MIX_ROLES)}
_NAMES = ("image", "strong_image", "theta", "stats", "alpha", "logits", "loss", "grad",
          "img_stats")
_PAGE = 4096           # tensors of 1 MiB and more start on a page (memory-mappable)
_ALIGN = 64


def max_opset() -> int:
    """The highest opset offered: the ops used here are checked up to MAX_OPSET."""
    return min(MAX_OPSET, onnx.defs.onnx_opset_version())


def _resolve_model(model_or_checkpoint, arch: str) -> ResUnet:
    if isinstance(model_or_checkpoint, nn.Module):
        if getattr(model_or_checkpoint, "arch", arch) != arch:
            raise GrataError(f"export: the model is {model_or_checkpoint.arch!r}, "
                             f"not {arch!r}")
        model = copy.deepcopy(model_or_checkpoint)
    else:
        model = load_checkpoint(model_or_checkpoint, arch)
    model = model.to(device="cpu", dtype=torch.float32).eval()
    from grata.models import check_finite
    check_finite(model.state_dict(), "export")  # a NaN weight would predict NaN everywhere
    set_norm_mode(model, "sample")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _external(name: str, array: np.ndarray, offset: int) -> TensorProto:
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(array.shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", WEIGHTS), ("offset", str(offset)),
                       ("length", str(array.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _build_role(model: ResUnet, role: str, size: int, opset: int, layout: list[dict],
                teacher_views: int = TEACHER_VIEWS):
    from grata.export.lower import Lowering

    n_theta = sum(e["shape"][0] for e in layout)
    base = MIX_ROLES.get(role, role)
    gm = trace(model, base, size, teacher_views)
    b = GraphBuilder(opset)
    b.reserve(*_NAMES)
    forward = base in ("infer", "infer_source")
    norm = "running" if role == "infer_source" else "mix" if role in MIX_ROLES else "sample"
    low = Lowering(gm, b, layout, grad=not forward, norm=norm)
    out = low.run()
    inputs = [(n, [1, 3, size, size]) for n in INPUTS[base]] + [("theta", [n_theta])]
    if norm == "mix":
        inputs += [("stats", [n_theta]), ("alpha", [1])]
    if forward:
        out_shape = list(low.shape(next(n for n in gm.graph.nodes if n.op == "output")
                                   .args[0]))
        b.op("Identity", [out], outputs=["logits"])
        outputs = [("logits", out_shape)]
        if norm == "mix":
            b.op("Identity", [low.img_stats_output()], outputs=["img_stats"])
            outputs.append(("img_stats", [n_theta]))
    else:
        b.op("Identity", [out], outputs=["loss"])
        b.op("Identity", [low.theta_grad()], outputs=["grad"])
        outputs = [("loss", []), ("grad", [n_theta])]
    return b, inputs, outputs


def _versions() -> dict:
    try:
        grata_version = metadata.version("grata-edge")
    except metadata.PackageNotFoundError:
        grata_version = grata.__version__
    return {"torch": torch.__version__, "onnx": onnx.__version__, "grata": grata_version}


def export_artifacts(model_or_checkpoint, arch: str, size: int, out_dir,
                     opset: int = MIN_OPSET, teacher_views: int = TEACHER_VIEWS,
                     disc_scale: DiscScale | None = None) -> dict:
    """Write the artifact folder for `arch` at `size` x `size` into `out_dir`; return
    its manifest. See `grata.export.export_artifacts`."""
    if disc_scale is not None and not isinstance(disc_scale, DiscScale):
        raise GrataError(f"export: disc_scale must be a DiscScale, not "
                         f"{type(disc_scale).__name__}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 64 or size % 32:
        # at 32 the bottleneck is 1x1 and per-sample BN statistics are undefined
        raise GrataError(f"export: size must be a multiple of 32, at least 64 "
                         f"(got {size!r})")
    top = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise GrataError(f"export: opset must be between {MIN_OPSET} and {top} "
                         f"(got {opset!r})")
    check_teacher_views(teacher_views)
    out = check_out_folder(out_dir)  # before any work: never replace a foreign folder
    model = _resolve_model(model_or_checkpoint, arch)
    layout = theta_layout(model)
    theta0 = torch.cat([p.detach().reshape(-1) for p in bn_parameters(model)]).numpy()
    theta0 = theta0.astype(np.float32)
    stats0 = np.concatenate([t.detach().reshape(-1).numpy() for _, m in norm_layers(model)
                             for t in (m.running_mean, m.running_var)]).astype(np.float32)

    built = {role: _build_role(model, role, size, opset, layout, teacher_views)
             for role in GRAPH_FILES}

    # One weights file: every frozen tensor once, in state-dict order.
    weights: dict[str, np.ndarray] = {}
    for b, _, _ in built.values():
        for name, arr in b.weights.items():
            if name in weights and not np.array_equal(weights[name], arr):
                raise GrataError(f"export: two different tensors named {name}")
            weights[name] = arr
    # a derived kernel (<w>.flipT) right after its source
    order = {k: i for i, k in enumerate(model.state_dict())}
    names = sorted(weights, key=lambda k: (order.get(k.removesuffix(FLIPPED), len(order)), k))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        offsets, pos = {}, 0
        with open(tmp / WEIGHTS, "wb") as f:
            for name in names:
                arr = weights[name]
                align = _PAGE if arr.nbytes >= (1 << 20) else _ALIGN
                pad = -pos % align
                f.write(b"\0" * pad)
                pos += pad
                offsets[name] = pos
                f.write(arr.tobytes())
                pos += arr.nbytes
        io = {}
        for role, (b, inputs, outputs) in built.items():
            proto = b.build(f"grata_{role}", inputs, outputs,
                            doc=f"GraTa {role} of ResUnet-{arch} at {size}x{size}",
                            weight_proto=lambda n, a: _external(n, a, offsets[n]))
            path = tmp / GRAPH_FILES[role]
            path.write_bytes(proto.SerializeToString())
            try:
                onnx.checker.check_model(str(path), full_check=True)
            except (onnx.checker.ValidationError,
                    onnx.shape_inference.InferenceError) as exc:  # an exporter bug
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise GrataError(f"export: {role} graph fails the ONNX checker: "
                                 f"{type(exc).__name__}: {first}") from None
            io[role] = {"inputs": {n: list(s) for n, s in inputs},
                        "outputs": {n: list(s) for n, s in outputs}}
        np.save(tmp / THETA0, theta0)
        np.save(tmp / STATS0, stats0)
        manifest = write_manifest(tmp, {
            "arch": arch, "size": size, "opset": opset, "batch": 1, "norm": "sample",
            "norms": list(NORMS), "mix_graphs": dict(MIX_ROLES),
            "graphs": dict(GRAPH_FILES), "io": io, "weights": WEIGHTS,
            "params": [{"name": e["name"], "offset": e["offset"], "shape": list(e["shape"])}
                       for e in layout],
            "theta0": THETA0, "stats0": STATS0, "n_theta": int(theta0.size),
            "versions": _versions(), "teacher_views": teacher_views,
            # where each frozen tensor lies in the weights file, so a runtime can map it
            # once and hand the same memory to every graph (no onnx parser needed)
            "weights_index": {n: {"offset": offsets[n], "shape": list(weights[n].shape)}
                              for n in names},
            # the disc's scale in the training crops (grata.disc_scale), when known
            **({"disc_scale": disc_scale.to_json()} if disc_scale is not None else {}),
        })
        replace_folder_atomically(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest

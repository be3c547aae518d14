"""The machine's dense-convolution limit for one model: its convolutions and transposed
convolutions alone, at the shapes one forward pass gives them, as one ONNX graph of
independent layers (each fed its own input, nothing between them). Its rate (forward
FLOPs / time) is what the same CPU does when it does nothing but these convolutions;
adaptation's GFLOP/s is read against it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from grata.runtime.ort_session import import_onnxruntime, session_options

LIMIT_FILE = "convs.onnx"


def conv_graph(arch: str, size: int, seed: int, out: Path) -> dict:
    """Write the convolutions of a random `arch` ResUnet at `size` (torch.manual_seed
    (seed)) as one ONNX graph into `out`; return {"layers", "forward_flops", "path"}.
    Needs torch and onnx (the parent process of `grata bench adapt` has them)."""
    import torch
    from onnx import TensorProto, helper, numpy_helper, save

    from grata.models import ResUnet, flops

    torch.manual_seed(seed)
    model = ResUnet(arch).eval()
    layers = []
    kinds = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    hooks = [m.register_forward_hook(lambda m, i, o: layers.append((m, tuple(i[0].shape),
                                                                     tuple(o.shape))))
             for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    nodes, weights, inputs, outputs = [], [], [], []
    for i, (m, ish, osh) in enumerate(layers):
        transposed = isinstance(m, torch.nn.ConvTranspose2d)
        attrs = {"kernel_shape": list(m.kernel_size), "strides": list(m.stride),
                 "pads": list(m.padding) * 2, "group": m.groups}
        if transposed and any(m.output_padding):
            attrs["output_padding"] = list(m.output_padding)
        ins = [f"x{i}", f"w{i}"]
        weights.append(numpy_helper.from_array(m.weight.detach().numpy(), f"w{i}"))
        if m.bias is not None:
            weights.append(numpy_helper.from_array(m.bias.detach().numpy(), f"b{i}"))
            ins.append(f"b{i}")
        nodes.append(helper.make_node("ConvTranspose" if transposed else "Conv", ins,
                                      [f"y{i}"], **attrs))
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, list(ish)))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, list(osh)))
    graph = helper.make_graph(nodes, f"convs_{arch}_{size}", inputs, outputs, weights)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(out))
    return {"layers": len(layers), "forward_flops": flops(model, size), "path": str(out)}


def conv_rate(path, forward_flops: int, threads: int, reps: int = 3) -> dict:
    """Time the convolutions-alone graph (`conv_graph`) with the runtime's session
    settings at `threads`: one warm-up run, then `reps`; the median gives the rate.
    onnxruntime and numpy only."""

    ort = import_onnxruntime()
    sess = ort.InferenceSession(str(path), sess_options=session_options(threads),
                                providers=["CPUExecutionProvider"])
    feeds = {i.name: np.random.default_rng(k).random(i.shape, dtype=np.float32)
             for k, i in enumerate(sess.get_inputs())}
    sess.run(None, feeds)
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    return {"forward_s": median, "min_s": float(min(times)), "reps": len(times),
            "gflops_per_s": forward_flops / median / 1e9}

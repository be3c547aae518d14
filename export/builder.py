"""A small ONNX graph builder: unique names, deduplicated constants, opset-aware helpers.

Torch-free. Frozen weights are registered by name (`weight`) and left for the caller to
store (the exporter writes them once, as external data shared by all graphs); every other
constant is small and stored inline.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
# name suffix of a frozen weight derived from another (`<w>.flipT`: the spatially
# flipped, in/out-swapped kernel of the convolution backward); stored like any weight
FLIPPED = ".flipT"
INT64_MIN = np.iinfo(np.int64).min


class GraphBuilder:
    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.constants: dict[str, np.ndarray] = {}   # inline initializers
        self.weights: dict[str, np.ndarray] = {}     # frozen weights (stored externally)
        self._const_keys: dict[tuple, str] = {}
        self._used: set[str] = set()
        self._cache: dict[tuple, str] = {}

    # -- names ------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        base = "".join(c if c.isalnum() or c in "._" else "_" for c in hint) or "v"
        name, i = base, 0
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name

    # -- nodes ------------------------------------------------------------------------
    def reserve(self, *names: str) -> None:
        """Keep `names` (graph inputs and outputs) out of the generated names."""
        self._used.update(names)

    def op(self, op_type: str, inputs, hint: str | None = None, n_out: int = 1,
           outputs=None, **attrs):
        """Append a node; return its output name (or list of names when n_out > 1).
        `outputs` names the outputs explicitly (reserved names such as graph outputs)."""
        outs = list(outputs) if outputs else [self.fresh(hint or op_type.lower())
                                              for _ in range(n_out)]
        n_out = len(outs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), outs,
                                           name=self.fresh("n_" + outs[0]), **attrs))
        return outs[0] if n_out == 1 else outs

    def cached(self, key: tuple, make) -> str:
        """Emit `make()` once per key (for values that depend only on constants)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # -- constants --------------------------------------------------------------------
    def const(self, value, dtype=np.float32, hint: str = "c") -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._const_keys:
            name = self.fresh(hint)
            self.constants[name] = arr
            self._const_keys[key] = name
        return self._const_keys[key]

    def ints(self, values) -> str:
        return self.const(list(values), np.int64, hint="i")

    def scalar(self, value: float) -> str:
        return self.const(value, np.float32, hint="s")

    def weight(self, name: str, array: np.ndarray) -> str:
        """A frozen weight initializer named `name` (e.g. its state-dict key)."""
        if name not in self.weights:
            if name in self._used:
                raise ValueError(f"weight name {name!r} clashes with a graph value")
            self._used.add(name)
            self.weights[name] = np.ascontiguousarray(array, dtype=np.float32)
        return name

    # -- helpers that differ between opsets -------------------------------------------
    def reduce(self, op_type: str, x: str, axes=None, keepdims: bool = True,
               hint: str | None = None, double: bool = False) -> str:
        """ReduceSum/Mean/SumSquare/Max over `axes` (None: all axes); `double`
        accumulates in float64 (onnxruntime's float32 reductions lose a few bits over
        long rows, where torch's cascade sums do not)."""
        if double:
            x64 = self.op("Cast", [x], (hint or "r") + "_f64", to=TensorProto.DOUBLE)
            r = self.reduce(op_type, x64, axes, keepdims, hint)
            return self.op("Cast", [r], hint, to=FLOAT)
        takes_input = op_type == "ReduceSum" or self.opset >= 18
        if axes is None:
            return self.op(op_type, [x], hint, keepdims=int(keepdims))
        if takes_input:
            return self.op(op_type, [x, self.ints(axes)], hint, keepdims=int(keepdims))
        return self.op(op_type, [x], hint, axes=list(axes), keepdims=int(keepdims))

    def slice(self, x: str, starts, ends, axes, steps=None, hint: str | None = None) -> str:
        inputs = [x, self.ints(starts), self.ints(ends), self.ints(axes)]
        if steps is not None:
            inputs.append(self.ints(steps))
        return self.op("Slice", inputs, hint)

    def flip(self, x: str, axes, hint: str | None = None) -> str:
        axes = list(axes)
        return self.slice(x, [-1] * len(axes), [INT64_MIN] * len(axes), axes,
                          [-1] * len(axes), hint=hint or "flip")

    def pad(self, x: str, begins, ends, value: float | None = None,
            hint: str | None = None) -> str:
        inputs = [x, self.ints(list(begins) + list(ends))]
        if value is not None:
            inputs.append(self.scalar(value))
        return self.op("Pad", inputs, hint or "pad", mode="constant")

    def unsqueeze(self, x: str, axes, hint: str | None = None) -> str:
        return self.op("Unsqueeze", [x, self.ints(axes)], hint)

    def reshape(self, x: str, shape, hint: str | None = None) -> str:
        return self.op("Reshape", [x, self.ints(shape)], hint)

    def expand(self, x: str, shape, hint: str | None = None) -> str:
        return self.op("Expand", [x, self.ints(shape)], hint)

    # -- assembly ---------------------------------------------------------------------
    def build(self, name: str, inputs, outputs, doc: str = "",
              weight_proto=None) -> onnx.ModelProto:
        """Assemble the model. `inputs`/`outputs` are (name, shape) float32 pairs;
        `weight_proto(name, array)` turns a frozen weight into its TensorProto (default:
        stored inline)."""
        make_w = weight_proto or (lambda n, a: numpy_helper.from_array(a, n))
        inits = [make_w(n, a) for n, a in self.weights.items()]
        inits += [numpy_helper.from_array(a, n) for n, a in self.constants.items()]
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(n, FLOAT, list(s)) for n, s in inputs],
            [helper.make_tensor_value_info(n, FLOAT, list(s)) for n, s in outputs],
            initializer=inits, doc_string=doc)
        opset = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opset, producer_name="grata.export",
                                  ir_version=helper.find_min_ir_version_for(opset))
        return model

"""Lower a traced GraTa function (see `trace`) to ONNX, with its gradient wrt theta.

Forward: each FX node becomes a few standard ONNX ops. BN layers take gamma/beta as
slices of the flat `theta` input and use the statistics of each sample (the spec's
current-image BN): InstanceNormalization where no gradient is needed, and an explicit
mean/variance form that keeps the normalised activations where one is. With mixed
statistics (``norm="mix"``) every BN layer mixes each sample's statistics with prior ones
read from the flat `stats` input (theta's layout: means at the weight's offsets, variances
at the bias's) at the weight given by the `alpha` input (see `grata.norm`).

Backward (reverse mode, written here op by op): only the nodes that depend on theta and
lie on a differentiable path to the loss get a backward; `detach` stops the gradient (the
teacher). Choices made for CPU speed with exact results:
- input gradient of a stride-1 convolution: a convolution with the spatially flipped,
  in/out-swapped weights, computed here and stored as a frozen weight of its own
  (`<weight>.flipT`), so every gradient graph reads the one copy in the weights file
  instead of each session folding its own; strided: a transposed convolution;
- transposed convolution: a convolution with the same weights;
- ReLU: multiply by the 0/1 mask (out > 0);
- max-pool: first-max masks per window offset (torch's tie rule), scattered back by
  padding and interleaving, no ScatterElements;
- BN (instance norm) backward exact: dbeta = sum dy, dgamma = sum dy * xhat,
  dx = gamma * rstd * (dy - mean dy - xhat * mean(dy * xhat)); per-channel sums run
  row by row, then across rows (see `hw_sum`);
- BN with mixed statistics: the same with xhat normalised by the mixture and the two
  mean terms scaled by alpha, dx = gamma * rstd * (dy - a mean dy - a xhat mean(dy * xhat))
  (the between-means term's gradients through mu_img cancel: see `b_norm`).
Frozen weights are registered with the builder under their state-dict names.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from grata.errors import GrataError
from grata.models import Norm2d

from grata.export.builder import FLIPPED, FLOAT, GraphBuilder

PREFIX = "model."
GRAPH_INPUTS = ("image", "strong_image")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _bind(node: fx.Node, names, defaults=None) -> dict:
    """Map a call's positional and keyword arguments to parameter names."""
    out = dict(defaults or {})
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    unknown = set(out) - set(names)
    if unknown:
        raise GrataError(f"export: {node.target} called with unsupported arguments "
                         f"{sorted(unknown)}")
    return out


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


class Lowering:
    """Emit the ONNX graph of one traced function into `builder`.

    `layout` is theta's layout (`grata.models.theta_layout`); with `grad=True` the graph
    also computes d(output)/d(theta) (the output must be a scalar). `norm` is
    ``sample`` (statistics of each sample), ``running`` (the stored statistics, forward
    only) or ``mix`` (each sample's statistics mixed with the graph inputs `stats` at
    weight `alpha`; `img_stats_output` then gives the per-image statistics).
    """

    def __init__(self, gm: fx.GraphModule, builder: GraphBuilder, layout: list[dict],
                 grad: bool, norm: str = "sample"):
        if norm not in ("sample", "running", "mix") or (grad and norm == "running"):
            raise GrataError(f"export: unsupported BN statistics {norm!r}")
        self.gm, self.b, self.grad, self.norm = gm, builder, grad, norm
        self.layout = layout
        self.entries = {e["name"]: e for e in layout}
        self.n_theta = sum(int(np.prod(e["shape"])) for e in layout)
        self.env: dict[fx.Node, str] = {}
        self.saved: dict[fx.Node, dict] = {}
        self.grads: dict[fx.Node, str] = {}
        self.theta_grads: dict[str, list[str]] = {}
        self.img_stats: dict[str, tuple[str, str]] = {}  # BN name -> (mean, var) [N,C,1,1]
        self.nodes = list(gm.graph.nodes)
        self.needs = self._needs_grad() if grad else set()

    # -- helpers ------------------------------------------------------------------------
    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    @staticmethod
    def modname(node: fx.Node) -> str:
        """The module's name in the model's state dict."""
        return str(node.target).removeprefix(PREFIX)

    @staticmethod
    def shape(node: fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise GrataError(f"export: no tensor shape recorded for {node.name}")
        return tuple(int(s) for s in meta.shape)

    def v(self, a) -> str:
        if isinstance(a, fx.Node):
            return self.env[a]
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return self.b.scalar(float(a))
        raise GrataError(f"export: unsupported argument {a!r}")

    def theta_slice(self, pname: str, source: str = "theta") -> str:
        """gamma/beta of `pname` from theta (or the same span of another flat input)."""
        e = self.entries.get(pname)
        if e is None:
            raise GrataError(f"export: {pname} is not in theta's layout")
        n = int(np.prod(e["shape"]))
        return self.b.cached((source, pname), lambda: self.b.slice(
            source, [e["offset"]], [e["offset"] + n], [0], hint=f"{source}_{pname}"))

    def _needs_grad(self) -> set[fx.Node]:
        """Nodes that depend on theta and reach the output through no `detach`."""
        req: dict[fx.Node, bool] = {}
        for n in self.nodes:
            if n.op == "call_module" and isinstance(self.module(n), Norm2d):
                req[n] = True
            elif n.op == "call_method" and n.target == "detach":
                req[n] = False
            else:
                req[n] = any(req.get(a, False) for a in n.all_input_nodes)
        reach: set[fx.Node] = set()
        for n in reversed(self.nodes):
            if n.op == "output" or n in reach:
                reach.add(n)
                if not (n.op == "call_method" and n.target == "detach"):
                    reach.update(n.all_input_nodes)
        return {n for n in self.nodes if req[n] and n in reach and n.op != "output"}

    def acc(self, node, g: str) -> None:
        """Add gradient `g` to `node` (ignored unless the node needs one)."""
        if not isinstance(node, fx.Node) or node not in self.needs:
            return
        self.grads[node] = g if node not in self.grads else \
            self.b.op("Add", [self.grads[node], g], "g_" + node.name)

    def unbroadcast(self, g: str, in_shape, out_shape) -> str:
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        if in_shape == out_shape:
            return g
        lead = len(out_shape) - len(in_shape)
        padded = (1,) * lead + in_shape
        axes = [i for i, (a, o) in enumerate(zip(padded, out_shape)) if a == 1 and o != 1]
        axes = sorted(set(axes) | set(range(lead)))
        if axes:
            g = self.b.reduce("ReduceSum", g, axes, keepdims=True)
        return self.b.reshape(g, list(in_shape))

    # -- driver -------------------------------------------------------------------------
    def run(self) -> str:
        """Emit the forward (and backward); return the output value's name."""
        out = None
        for n in self.nodes:
            if n.op == "placeholder":
                if n.target not in GRAPH_INPUTS:
                    raise GrataError(f"export: unexpected input {n.target}")
                self.env[n] = n.target
            elif n.op == "output":
                out = n.args[0]
                if not isinstance(out, fx.Node):
                    raise GrataError("export: the traced function must return one tensor")
            else:
                self.env[n] = self._forward(n)
        if self.grad:
            if self.shape(out) != ():
                raise GrataError("export: gradients need a scalar output")
            self.grads[out] = self.b.scalar(1.0)
            if out not in self.needs:
                raise GrataError("export: the output does not depend on theta")
            for n in reversed(self.nodes):
                if n in self.needs and n in self.grads:
                    self._backward(n, self.grads[n])
        return self.env[out]

    def theta_grad(self) -> str:
        """One flat gradient in theta's layout (zeros where theta has no influence)."""
        parts = []
        for e in self.layout:
            gs = self.theta_grads.get(e["name"])
            if not gs:
                parts.append(self.b.const(np.zeros(e["shape"], np.float32), hint="zeros"))
                continue
            g = gs[0]
            for other in gs[1:]:
                g = self.b.op("Add", [g, other], "d_" + e["name"])
            parts.append(g)
        return self.b.op("Concat", parts, "dtheta", axis=0)

    # -- dispatch -----------------------------------------------------------------------
    def _key(self, n: fx.Node):
        if n.op == "call_module":
            m = self.module(n)
            if isinstance(m, Norm2d):
                return "norm"
            if type(m) is nn.Conv2d:
                return "conv"
            if type(m) is nn.ConvTranspose2d:
                return "convt"
            raise GrataError(f"export: unsupported module {type(m).__name__} ({n.target})")
        if n.op == "call_method":
            if n.target in ("flip", "sum", "mean", "detach", "sigmoid", "log", "neg",
                            "reshape"):
                return n.target
            raise GrataError(f"export: unsupported tensor method .{n.target}()")
        if n.op == "call_function":
            key = _FUNCTIONS.get(n.target)
            if key is None:
                raise GrataError(f"export: unsupported function {n.target}")
            return key
        raise GrataError(f"export: unsupported FX node {n.op}")

    def _forward(self, n: fx.Node) -> str:
        return getattr(self, "f_" + self._key(n))(n)

    def _backward(self, n: fx.Node, dy: str) -> None:
        fn = getattr(self, "b_" + self._key(n), None)
        if fn is None:
            raise GrataError(f"export: no gradient rule for {n.target}")
        fn(n, dy)

    # -- convolutions -------------------------------------------------------------------
    def _conv_params(self, m):
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise GrataError(f"export: unsupported padding {m.padding!r}/{m.padding_mode}")
        return _pair(m.kernel_size), _pair(m.stride), _pair(m.padding), _pair(m.dilation)

    def _weights(self, n, m):
        name = self.modname(n)
        ins = [self.b.weight(name + ".weight", _numpy(m.weight))]
        if m.bias is not None:
            ins.append(self.b.weight(name + ".bias", _numpy(m.bias)))
        return ins

    def f_conv(self, n):
        m = self.module(n)
        k, s, p, d = self._conv_params(m)
        return self.b.op("Conv", [self.v(n.args[0])] + self._weights(n, m), n.name,
                         kernel_shape=list(k), strides=list(s), pads=list(p + p),
                         dilations=list(d), group=m.groups)

    def b_conv(self, n, dy):
        x = n.args[0]
        if x not in self.needs:
            return
        m = self.module(n)
        if m.groups != 1:
            raise GrataError(f"export: no gradient rule for grouped convolution {n.target}")
        k, s, p, d = self._conv_params(m)
        w = self._weights(n, m)[0]
        in_hw, out_hw = self.shape(x)[2:], self.shape(n)[2:]
        if s == (1, 1):
            # dx = conv(dy, flip(W)^T) with the complementary padding; the kernel is
            # exact (a permutation of W), stored once beside W for every graph.
            wf = self.b.cached(("flipT", w), lambda: self.b.weight(
                w + FLIPPED, _numpy(m.weight)[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)))
            pads = [d[i] * (k[i] - 1) - p[i] for i in range(2)]
            if min(pads) < 0:
                raise GrataError(f"export: no gradient rule for {n.target} (padding > kernel)")
            dx = self.b.op("Conv", [dy, wf], "d_" + n.name, kernel_shape=list(k),
                           pads=pads + pads, dilations=list(d))
        else:
            op = [in_hw[i] - ((out_hw[i] - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + 1)
                  for i in range(2)]
            dx = self.b.op("ConvTranspose", [dy, w], "d_" + n.name, kernel_shape=list(k),
                           strides=list(s), pads=list(p + p), dilations=list(d),
                           output_padding=op)
        self.acc(x, dx)

    def f_convt(self, n):
        m = self.module(n)
        k, s, p, d = self._conv_params(m)
        return self.b.op("ConvTranspose", [self.v(n.args[0])] + self._weights(n, m), n.name,
                         kernel_shape=list(k), strides=list(s), pads=list(p + p),
                         dilations=list(d), group=m.groups,
                         output_padding=list(_pair(m.output_padding)))

    def b_convt(self, n, dy):
        x = n.args[0]
        if x not in self.needs:
            return
        m = self.module(n)
        if m.groups != 1:
            raise GrataError(f"export: no gradient rule for grouped convolution {n.target}")
        k, s, p, d = self._conv_params(m)
        dx = self.b.op("Conv", [dy, self._weights(n, m)[0]], "d_" + n.name,
                       kernel_shape=list(k), strides=list(s), pads=list(p + p),
                       dilations=list(d))
        self.acc(x, dx)

    # -- BN with the statistics of each sample ------------------------------------------
    def f_norm(self, n):
        m = self.module(n)
        if m.weight is None or m.bias is None:
            raise GrataError(f"export: {n.target} has no affine parameters")
        name = self.modname(n)
        gamma, beta = self.theta_slice(name + ".weight"), self.theta_slice(name + ".bias")
        x = self.v(n.args[0])
        if self.norm == "running":
            if m.running_mean is None or m.running_var is None:
                raise GrataError(f"export: {n.target} keeps no running statistics")
            stats = [self.b.weight(name + ".running_mean", _numpy(m.running_mean)),
                     self.b.weight(name + ".running_var", _numpy(m.running_var))]
            return self.b.op("BatchNormalization", [x, gamma, beta, *stats], n.name,
                             epsilon=float(m.eps))
        if self.norm == "mix":
            return self._mix_norm(n, m, name, gamma, beta, x)
        if n not in self.needs:
            return self.b.op("InstanceNormalization", [x, gamma, beta], n.name,
                             epsilon=float(m.eps))
        c = self.shape(n)[1]
        hw = math.prod(self.shape(n)[2:])
        g4 = self.b.cached(("g4", name), lambda: self.b.reshape(gamma, [1, c, 1, 1]))
        inv_hw = self.b.scalar(1.0 / hw)
        mu = self.b.op("Mul", [self.hw_sum(x, n.name + "_sum"), inv_hw], n.name + "_mu")
        xc = self.b.op("Sub", [x, mu], n.name + "_xc")
        ss = self.hw_sum(xc, n.name + "_ss", square=True)
        var = self.b.op("Mul", [ss, inv_hw], n.name + "_var")
        std = self.b.op("Sqrt", [self.b.op("Add", [var, self.b.scalar(float(m.eps))])])
        rstd = self.b.op("Reciprocal", [std], n.name + "_rstd")
        # (keeping xc instead of xhat saves a pass but measured up to 3x less exact)
        xhat = self.b.op("Mul", [xc, rstd], n.name + "_xhat")
        self.saved[n] = self._save_norm(n, x, mu, rstd, xhat, g4, hw)
        return self.affine(xhat, gamma, beta, self.shape(n)[1], n.name)

    def affine(self, x: str, scale: str, bias: str, c: int, hint: str | None = None) -> str:
        """x * scale + bias with per-channel [C] scale and bias, as one inference-mode
        BatchNormalization in one pass instead of Mul then Add (half their time on these
        tensors), with the same bits: mean 0, and variance 1 - eps in float32 so that
        var + eps is 1.0 exactly (its scale is then scale / sqrt(1), its shift bias).
        epsilon stays at the ONNX default 1e-5, which cuDNN's minimum never clamps."""
        ones = self.b.cached(("var1", c), lambda: self.b.const(
            np.full(c, np.float32(1) - np.float32(AFFINE_EPS), np.float32), hint="var_c"))
        zeros = self.b.cached(("zeros", c), lambda: self.b.const(np.zeros(c, np.float32),
                                                                  hint="zeros_c"))
        return self.b.op("BatchNormalization", [x, scale, bias, zeros, ones], hint,
                         epsilon=AFFINE_EPS)

    def _save_norm(self, n, x: str, mu: str, rstd: str, xhat: str, g4: str, hw: int) -> dict:
        """What BN's backward keeps: xhat, or where the input is kept for another backward
        anyway (a ReLU's output, for its mask) only the statistics, xhat being recomputed
        there bit for bit: one activation-sized tensor less alive from the forward to the
        backward (64 MiB per UnetBlock at ResNet-34 512x512)."""
        saved = {"a": self.b.op("Mul", [g4, rstd], n.name + "_a"), "hw": hw}
        src = n.args[0]
        if isinstance(src, fx.Node) and src in self.needs and src.op != "placeholder" \
                and self._key(src) == "relu":
            saved.update(x=x, mu=mu, rstd=rstd)
        else:
            saved["xhat"] = xhat
        return saved

    def zero_after(self, n: fx.Node, dy: str) -> str:
        """A scalar 0 computed from `dy`, the gradient of node `n` (its first element
        times 0). A backward value that depends only on forward tensors is run by
        onnxruntime as soon as they exist, which keeps it alive from the forward on;
        depending on `dy` runs it when the backward reaches it. (NaN only where dy is
        non-finite already.)"""
        rank = len(self.shape(n))
        first = self.b.slice(dy, [0] * rank, [1] * rank, list(range(rank)),
                             hint=n.name + "_first")
        return self.b.op("Mul", [first, self.b.scalar(0.0)], n.name + "_zero")

    def _xhat(self, n, sv: dict, dy: str) -> str:
        """BN's normalised input in the backward: kept, or recomputed from the kept input
        once the backward reaches it. (0 - mu) equals -mu and x + (-mu) equals x - mu
        exactly, and the different nodes keep onnxruntime's common-subexpression pass
        from merging the recompute with the forward's (which would keep it alive)."""
        if "xhat" in sv:
            return sv["xhat"]
        b = self.b
        neg_mu = b.op("Sub", [self.zero_after(n, dy), sv["mu"]])
        xc = b.op("Add", [sv["x"], neg_mu], n.name + "_xc_again")
        return b.op("Mul", [xc, sv["rstd"]], n.name + "_xhat_again")

    def _mix_norm(self, n, m, name: str, gamma: str, beta: str, x: str) -> str:
        """BN with each sample's statistics mixed with the prior ones (`stats`) at `alpha`:
        mu = (1-a) mu_p + a mu_i, var = (1-a) var_p + a var_i + a (1-a) (mu_i - mu_p)^2.
        (1-a) and a multiply separately so that a = 1 gives the sample form and a = 0 the
        prior exactly."""
        b = self.b
        c = self.shape(n)[1]
        hw = math.prod(self.shape(n)[2:])
        g4 = b.cached(("g4", name), lambda: b.reshape(gamma, [1, c, 1, 1]))
        mean_p = b.cached(("mean_p", name), lambda: b.reshape(
            self.theta_slice(name + ".weight", "stats"), [1, c, 1, 1]))
        var_p = b.cached(("var_p", name), lambda: b.reshape(
            self.theta_slice(name + ".bias", "stats"), [1, c, 1, 1]))
        one_minus = b.cached(("1-a",), lambda: b.op("Sub", [b.scalar(1.0), "alpha"],
                                                     "one_minus_alpha"))
        aa = b.cached(("a(1-a)",), lambda: b.op("Mul", ["alpha", one_minus], "alpha_1ma"))
        inv_hw = b.scalar(1.0 / hw)
        mu_i = b.op("Mul", [self.hw_sum(x, n.name + "_sum"), inv_hw], n.name + "_mu_img")
        xc_i = b.op("Sub", [x, mu_i], n.name + "_xc_img")
        var_i = b.op("Mul", [self.hw_sum(xc_i, n.name + "_ss", square=True), inv_hw],
                     n.name + "_var_img")
        if self.shape(n)[0] == 1:
            self.img_stats.setdefault(name, (mu_i, var_i))
        d = b.op("Sub", [mu_i, mean_p], n.name + "_d")
        mu = b.op("Add", [b.op("Mul", [one_minus, mean_p]), b.op("Mul", ["alpha", mu_i])],
                  n.name + "_mu")
        var = b.op("Add", [b.op("Add", [b.op("Mul", [one_minus, var_p]),
                                        b.op("Mul", ["alpha", var_i])]),
                           b.op("Mul", [aa, b.op("Mul", [d, d])])], n.name + "_var")
        std = b.op("Sqrt", [b.op("Add", [var, b.scalar(float(m.eps))])])
        rstd = b.op("Reciprocal", [std], n.name + "_rstd")
        xhat = b.op("Mul", [b.op("Sub", [x, mu], n.name + "_xc"), rstd], n.name + "_xhat")
        if n in self.needs:
            self.saved[n] = self._save_norm(n, x, mu, rstd, xhat, g4, hw)
        return self.affine(xhat, gamma, beta, self.shape(n)[1], n.name)

    def img_stats_output(self) -> str:
        """The per-image statistics of a batch-1 mixed graph as one flat vector in theta's
        layout (each BN layer's means, then its biased variances)."""
        parts = []
        for e in self.layout:
            layer, kind = e["name"].rsplit(".", 1)
            if layer not in self.img_stats:
                raise GrataError(f"export: no image statistics for {layer}")
            value = self.img_stats[layer][0 if kind == "weight" else 1]
            parts.append(self.b.reshape(value, [int(np.prod(e["shape"]))]))
        return self.b.op("Concat", parts, "img_stats_flat", axis=0)

    def hw_sum(self, x: str, hint: str, square: bool = False) -> str:
        """Per-(sample, channel) sum (of squares) over H, W, kept as [N, C, 1, 1].

        onnxruntime reduces a long row with a few float32 accumulators; summing row by
        row and then across rows is several times more exact at no cost, and the BN
        statistics (hence the gradients through them) need it to match torch."""
        first = self.b.reduce("ReduceSumSquare" if square else "ReduceSum", x, [3],
                              hint=hint)
        return self.b.reduce("ReduceSum", first, [2], hint=hint)

    def b_norm(self, n, dy):
        # dbeta = sum dy, dgamma = sum dy * xhat,
        # dx = a * (dy - mean dy - xhat * mean(dy * xhat)), a = gamma * rstd
        sv, name, b = self.saved[n], self.modname(n), self.b
        xhat = self._xhat(n, sv, dy)
        s1 = self.hw_sum(dy, n.name + "_s1")
        s2 = self.hw_sum(b.op("Mul", [dy, xhat]), n.name + "_s2")
        self.theta_grads.setdefault(name + ".bias", []).append(
            b.reduce("ReduceSum", s1, [0, 2, 3], keepdims=False, hint="d_" + name))
        self.theta_grads.setdefault(name + ".weight", []).append(
            b.reduce("ReduceSum", s2, [0, 2, 3], keepdims=False, hint="d_" + name))
        x = n.args[0]
        if x not in self.needs:
            return
        # dx = a * dy + k2 * xhat + k1, k_i = -a * s_i / HW. With mixed statistics the
        # k_i carry a factor alpha: mu_i and var_i enter mu and var with weight alpha,
        # and the between-means term's gradient through mu_i, 2 a (1-a) d dvar / HW,
        # cancels against var_i's through (x - mu_i) = xhat / rstd - (1-a) d.
        scale = b.scalar(-1.0 / sv["hw"])
        if self.norm == "mix":
            scale = b.cached(("alpha/hw", sv["hw"]), lambda: b.op(
                "Mul", ["alpha", scale], "alpha_hw"))
        na = b.op("Mul", [sv["a"], scale])
        k1 = b.op("Mul", [na, s1])
        k2 = b.op("Mul", [na, s2])
        nb, c = self.shape(n)[:2]
        if nb != 1:  # the gradient graphs take one image; a and k1 are per sample
            raise GrataError(f"export: BN backward for a batch of {nb} is not supported")
        ady = self.affine(dy, b.reshape(sv["a"], [c]), b.reshape(k1, [c]), c)  # a*dy + k1
        self.acc(x, b.op("Add", [ady, b.op("Mul", [xhat, k2])], "d_" + n.name))

    # -- activations and pooling ---------------------------------------------------------
    def f_relu(self, n):
        if _bind(n, ("input", "inplace"), {"inplace": False})["inplace"]:
            raise GrataError("export: in-place relu is not supported")
        return self.b.op("Relu", [self.v(n.args[0])], n.name)

    def b_relu(self, n, dy):
        # dy * (out > 0); Greater + Cast + Mul runs ~4x faster in onnxruntime than
        # Sign or Where on these sizes
        active = self.b.op("Greater", [self.env[n], self.zero_after(n, dy)])
        mask = self.b.op("Cast", [active], to=FLOAT)
        self.acc(n.args[0], self.b.op("Mul", [dy, mask], "d_" + n.name))

    _POOL = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
             "return_indices")

    def _pool_params(self, n):
        a = _bind(n, self._POOL, {"stride": None, "padding": 0, "dilation": 1,
                                  "ceil_mode": False, "return_indices": False})
        if a["return_indices"] or a["ceil_mode"] or _pair(a["dilation"]) != (1, 1):
            raise GrataError("export: max_pool2d with indices, ceil_mode or dilation is "
                             "not supported")
        k = _pair(a["kernel_size"])
        s = _pair(a["stride"]) if a["stride"] not in (None, []) else k
        return a["input"], k, s, _pair(a["padding"])

    def f_maxpool(self, n):
        x, k, s, p = self._pool_params(n)
        return self.b.op("MaxPool", [self.v(x)], n.name, kernel_shape=list(k),
                         strides=list(s), pads=list(p + p))

    def b_maxpool(self, n, dy):
        x, k, s, p = self._pool_params(n)
        if x not in self.needs:
            return
        nb, c, hi, wi = self.shape(x)
        ho, wo = self.shape(n)[2:]
        b, y = self.b, self.env[n]
        # x + 0 from dy: the masks below are built when the backward reaches them
        xv = b.op("Add", [self.v(x), self.zero_after(n, dy)])
        xp = b.pad(xv, [0, 0, p[0], p[1]], [0, 0, p[0], p[1]], value=-math.inf)
        # Masks of the first maximum of each window, in torch's scan order (row-major).
        terms: dict[tuple[int, int], list] = {}
        notyet = None
        last = (k[0] - 1, k[1] - 1)
        for i in range(k[0]):
            for j in range(k[1]):
                xij = b.slice(xp, [i, j], [i + s[0] * (ho - 1) + 1, j + s[1] * (wo - 1) + 1],
                              [2, 3], [s[0], s[1]], hint=f"{n.name}_win")
                eq = b.op("Cast", [b.op("Equal", [xij, y])], to=FLOAT)
                if notyet is None:
                    mask = eq
                    notyet = b.op("Sub", [b.scalar(1.0), eq])
                else:
                    mask = b.op("Mul", [eq, notyet])
                    if (i, j) != last:
                        notyet = b.op("Sub", [notyet, mask])
                g = b.op("Mul", [dy, mask])
                terms.setdefault((i % s[0], j % s[1]), []).append((g, i // s[0], j // s[1]))
        # Window offset (i, j) of output (a, b) sits at padded position (s*a + i, s*b + j):
        # block a + i // s, phase i % s. Sum per phase, then interleave the phases.
        nh = max(ho + (k[0] - 1) // s[0], -(-(p[0] + hi) // s[0]))
        nw = max(wo + (k[1] - 1) // s[1], -(-(p[1] + wi) // s[1]))
        rows = []
        for ri in range(s[0]):
            cols = []
            for rj in range(s[1]):
                acc = None
                for g, bi, bj in terms.get((ri, rj), []):
                    t = b.pad(g, [0, 0, bi, bj], [0, 0, nh - ho - bi, nw - wo - bj])
                    acc = t if acc is None else b.op("Add", [acc, t])
                if acc is None:
                    acc = b.expand(b.scalar(0.0), [nb, c, nh, nw])
                cols.append(b.unsqueeze(acc, [3, 5]))
            rows.append(cols[0] if len(cols) == 1 else b.op("Concat", cols, axis=5))
        full = rows[0] if len(rows) == 1 else b.op("Concat", rows, axis=3)
        dxp = b.reshape(full, [nb, c, nh * s[0], nw * s[1]])
        dx = b.slice(dxp, [p[0], p[1]], [p[0] + hi, p[1] + wi], [2, 3], hint="d_" + n.name)
        self.acc(x, dx)

    def sigmoid(self, x: str, hint: str = "sigmoid") -> str:
        # 1 / (1 + exp(-x)): onnxruntime's Sigmoid kernel is a fast approximation
        # (relative errors up to 1e-2 where the output is small); Exp is accurate.
        b = self.b
        return b.op("Reciprocal", [b.op("Add", [b.scalar(1.0), b.op("Exp", [b.op("Neg", [x])])])],
                    hint)

    def f_sigmoid(self, n):
        return self.sigmoid(self.v(n.args[0]), n.name)

    def b_sigmoid(self, n, dy):
        y = self.env[n]
        d = self.b.op("Mul", [y, self.b.op("Sub", [self.b.scalar(1.0), y])])
        self.acc(n.args[0], self.b.op("Mul", [dy, d], "d_" + n.name))

    def f_log(self, n):
        return self.b.op("Log", [self.v(n.args[0])], n.name)

    def b_log(self, n, dy):
        self.acc(n.args[0], self.b.op("Div", [dy, self.v(n.args[0])], "d_" + n.name))

    # -- arithmetic -----------------------------------------------------------------------
    def f_add(self, n):
        self._plain(n)
        return self.b.op("Add", [self.v(a) for a in n.args], n.name)

    def b_add(self, n, dy):
        for a in n.args:
            if isinstance(a, fx.Node) and a in self.needs:
                self.acc(a, self.unbroadcast(dy, self.shape(a), self.shape(n)))

    def f_sub(self, n):
        self._plain(n)
        return self.b.op("Sub", [self.v(a) for a in n.args], n.name)

    def b_sub(self, n, dy):
        a, c = n.args
        if isinstance(a, fx.Node) and a in self.needs:
            self.acc(a, self.unbroadcast(dy, self.shape(a), self.shape(n)))
        if isinstance(c, fx.Node) and c in self.needs:
            self.acc(c, self.unbroadcast(self.b.op("Neg", [dy]), self.shape(c), self.shape(n)))

    def f_mul(self, n):
        self._plain(n)
        return self.b.op("Mul", [self.v(a) for a in n.args], n.name)

    def b_mul(self, n, dy):
        a, c = n.args
        for this, other in ((a, c), (c, a)):
            if isinstance(this, fx.Node) and this in self.needs:
                g = self.b.op("Mul", [dy, self.v(other)], "d_" + n.name)
                self.acc(this, self.unbroadcast(g, self.shape(this), self.shape(n)))

    @staticmethod
    def _plain(n):
        if n.kwargs or len(n.args) != 2:
            raise GrataError(f"export: {n.target} with extra arguments is not supported")

    def f_neg(self, n):
        return self.b.op("Neg", [self.v(n.args[0])], n.name)

    def b_neg(self, n, dy):
        self.acc(n.args[0], self.b.op("Neg", [dy], "d_" + n.name))

    def f_detach(self, n):
        return self.v(n.args[0])

    # -- reductions -----------------------------------------------------------------------
    def _dims(self, n, names=("input", "dim", "keepdim", "dtype")):
        if n.op == "call_method" and len(n.args) > 2 and all(isinstance(a, int)
                                                              for a in n.args[1:]):
            a = {"input": n.args[0], "dim": list(n.args[1:]), "keepdim": False}
        else:
            a = _bind(n, names, {"dim": None, "keepdim": False, "dtype": None})
        if a.get("dtype") is not None:
            raise GrataError(f"export: .{n.target}() with a dtype is not supported")
        rank = len(self.shape(a["input"]))
        dim = a["dim"]
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            dims = list(range(rank))
        else:
            dims = [dim] if isinstance(dim, int) else list(dim)
            dims = sorted(d % rank for d in dims)
        return a["input"], dims, bool(a["keepdim"])

    def f_sum(self, n):
        x, dims, keep = self._dims(n)
        return self.b.reduce("ReduceSum", self.v(x), dims, keepdims=keep, hint=n.name,
                             double=True)

    def f_mean(self, n):
        x, dims, keep = self._dims(n)
        return self.b.reduce("ReduceMean", self.v(x), dims, keepdims=keep, hint=n.name,
                             double=True)

    def _spread(self, n, dy, scale: float | None):
        x, dims, keep = self._dims(n)
        if scale is not None:
            dy = self.b.op("Mul", [dy, self.b.scalar(scale)])
        if not keep:
            dy = self.b.unsqueeze(dy, dims)
        self.acc(x, self.b.expand(dy, list(self.shape(x)), hint="d_" + n.name))

    def b_sum(self, n, dy):
        self._spread(n, dy, None)

    def b_mean(self, n, dy):
        x, dims, _ = self._dims(n)
        count = math.prod(self.shape(x)[d] for d in dims)
        self._spread(n, dy, 1.0 / count)

    # -- the consistency loss -------------------------------------------------------------
    _BCE = ("input", "target", "weight", "size_average", "reduce", "reduction",
            "pos_weight")

    def _bce_args(self, n):
        a = _bind(n, self._BCE, {"weight": None, "size_average": None, "reduce": None,
                                 "reduction": "mean", "pos_weight": None})
        if (a["weight"] is not None or a["pos_weight"] is not None
                or a["size_average"] is not None or a["reduce"] is not None
                or a["reduction"] != "mean"):
            raise GrataError("export: only the plain mean BCE-with-logits is supported")
        return a["input"], a["target"]

    def f_bce(self, n):
        # mean(max(z, 0) - z * t + log(1 + exp(-|z|)))
        z, t = self._bce_args(n)
        b, zv = self.b, self.v(z)
        soft = b.op("Log", [b.op("Add", [b.scalar(1.0),
                                         b.op("Exp", [b.op("Neg", [b.op("Abs", [zv])])])])])
        pos = b.op("Max", [zv, b.scalar(0.0)])
        el = b.op("Add", [b.op("Sub", [pos, b.op("Mul", [zv, self.v(t)])]), soft])
        return b.reduce("ReduceMean", el, None, keepdims=False, hint=n.name,
                        double=True)

    def b_bce(self, n, dy):
        z, t = self._bce_args(n)
        if isinstance(t, fx.Node) and t in self.needs:
            raise GrataError("export: no gradient rule for the BCE target")
        count = math.prod(self.shape(z))
        b = self.b
        scale = b.op("Mul", [dy, b.scalar(1.0 / count)])
        diff = b.op("Sub", [self.sigmoid(self.v(z)), self.v(t)])
        self.acc(z, b.op("Mul", [diff, scale], "d_" + n.name))

    # -- layout ops (the phase tail, teacher views) ------------------------------------------
    def f_reshape(self, n):
        return self.b.reshape(self.v(n.args[0]), list(self.shape(n)), hint=n.name)

    def b_reshape(self, n, dy):
        self.acc(n.args[0], self.b.reshape(dy, list(self.shape(n.args[0])),
                                           hint="d_" + n.name))

    def _shuffle(self, n) -> tuple:
        a = _bind(n, ("input", "upscale_factor"))
        return a["input"], int(a["upscale_factor"])

    def f_pixel_shuffle(self, n):
        x, r = self._shuffle(n)
        return self.b.op("DepthToSpace", [self.v(x)], n.name, blocksize=r, mode="CRD")

    def b_pixel_shuffle(self, n, dy):
        # the inverse permutation: [N, C, H r, W r] -> [N, C, H, r, W, r] -> [N, C r r, H, W]
        x, r = self._shuffle(n)
        nb, c, h, w = self.shape(n)
        t = self.b.reshape(dy, [nb, c, h // r, r, w // r, r])
        t = self.b.op("Transpose", [t], perm=[0, 1, 3, 5, 2, 4])
        self.acc(x, self.b.reshape(t, list(self.shape(x)), hint="d_" + n.name))

    # -- layout ops (teacher views) ---------------------------------------------------------
    def f_cat(self, n):
        a = _bind(n, ("tensors", "dim"), {"dim": 0})
        rank = len(self.shape(n))
        return self.b.op("Concat", [self.v(t) for t in a["tensors"]], n.name,
                         axis=a["dim"] % rank)

    def b_cat(self, n, dy):
        a = _bind(n, ("tensors", "dim"), {"dim": 0})
        axis = a["dim"] % len(self.shape(n))
        sizes = [self.shape(t)[axis] for t in a["tensors"]]
        parts = self.b.op("Split", [dy, self.b.ints(sizes)], "d_" + n.name,
                          n_out=len(sizes), axis=axis)
        parts = parts if isinstance(parts, list) else [parts]
        for t, g in zip(a["tensors"], parts):
            self.acc(t, g)

    def f_stack(self, n):
        a = _bind(n, ("tensors", "dim"), {"dim": 0})
        axis = a["dim"] % len(self.shape(n))
        parts = [self.b.unsqueeze(self.v(t), [axis]) for t in a["tensors"]]
        return self.b.op("Concat", parts, n.name, axis=axis)

    def b_stack(self, n, dy):
        a = _bind(n, ("tensors", "dim"), {"dim": 0})
        axis = a["dim"] % len(self.shape(n))
        k = len(a["tensors"])
        parts = self.b.op("Split", [dy, self.b.ints([1] * k)], "d_" + n.name, n_out=k,
                          axis=axis)
        parts = parts if isinstance(parts, list) else [parts]
        for t, g in zip(a["tensors"], parts):
            self.acc(t, self.b.op("Squeeze", [g, self.b.ints([axis])]))

    def _flip_dims(self, n):
        rank = len(self.shape(n))
        dims = list(n.args[1:]) if len(n.args) > 1 else list(n.kwargs.get("dims", ()))
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = list(dims[0])
        return sorted(d % rank for d in dims)

    def f_flip(self, n):
        return self.b.flip(self.v(n.args[0]), self._flip_dims(n), hint=n.name)

    def b_flip(self, n, dy):
        self.acc(n.args[0], self.b.flip(dy, self._flip_dims(n), hint="d_" + n.name))

    def _rot90(self, x: str, k: int, dims, rank: int, hint: str) -> str:
        d0, d1 = (d % rank for d in dims)
        k %= 4
        if k == 0:
            return self.b.op("Identity", [x], hint)
        if k == 2:
            return self.b.flip(x, sorted((d0, d1)), hint=hint)
        perm = list(range(rank))
        perm[d0], perm[d1] = d1, d0
        flipped = self.b.flip(x, [d1 if k == 1 else d0])
        return self.b.op("Transpose", [flipped], hint, perm=perm)

    def _rot_args(self, n):
        a = _bind(n, ("input", "k", "dims"), {"k": 1, "dims": (0, 1)})
        return a["input"], int(a["k"]), tuple(a["dims"])

    def f_rot90(self, n):
        x, k, dims = self._rot_args(n)
        return self._rot90(self.v(x), k, dims, len(self.shape(n)), n.name)

    def b_rot90(self, n, dy):
        x, k, dims = self._rot_args(n)
        self.acc(x, self._rot90(dy, -k, dims, len(self.shape(n)), "d_" + n.name))

    def _index(self, n):
        x, idx = n.args
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not all(isinstance(s, slice) and s.step in (None, 1) for s in idx):
            raise GrataError(f"export: unsupported indexing {idx!r}")
        shape = self.shape(x)
        spans = []
        for axis, s in enumerate(idx):
            start, stop, _ = s.indices(shape[axis])
            spans.append((axis, start, max(start, stop)))
        return x, shape, spans

    def f_getitem(self, n):
        x, _, spans = self._index(n)
        if not spans:
            return self.v(x)
        return self.b.slice(self.v(x), [s for _, s, _ in spans], [e for _, _, e in spans],
                            [a for a, _, _ in spans], hint=n.name)

    def b_getitem(self, n, dy):
        x, shape, spans = self._index(n)
        begins, ends = [0] * len(shape), [0] * len(shape)
        for axis, s, e in spans:
            begins[axis], ends[axis] = s, shape[axis] - e
        self.acc(x, self.b.pad(dy, begins, ends, hint="d_" + n.name))


# BatchNormalization's epsilon in `Lowering.affine` (float32(1 - 1e-5) + 1e-5 == 1.0)
AFFINE_EPS = 1e-5

_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu",
    F.max_pool2d: "maxpool",
    torch.cat: "cat", torch.concat: "cat", torch.stack: "stack",
    operator.add: "add", torch.add: "add",
    operator.sub: "sub", torch.sub: "sub",
    operator.mul: "mul", torch.mul: "mul",
    operator.neg: "neg", torch.neg: "neg",
    torch.sigmoid: "sigmoid", torch.log: "log",
    torch.rot90: "rot90", torch.flip: "flip",
    operator.getitem: "getitem",
    F.binary_cross_entropy_with_logits: "bce",
    F.pixel_shuffle: "pixel_shuffle", torch.pixel_shuffle: "pixel_shuffle",
}

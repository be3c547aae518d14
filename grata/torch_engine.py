"""The PyTorch reference engine: forward passes and BN-affine gradients of one model.

An engine owns theta (the flat vector of every BN gamma/beta) and answers the three
questions every method asks: the logits, the entropy gradient and the consistency
gradient at the current theta. `grata.runtime.ort_engine.OrtEngine` answers the same
questions with ONNX graphs, so the methods run unchanged on either.

Each question takes the BN statistics rule `norm` (a `grata.norm.NormSpec` or its text;
the teacher views, the student and the prediction all use it). The engine also owns the
statistics vectors (theta's layout, see `grata.norm`): `stats0` (the stored running
statistics), `stats` (the stream estimate that ``ema`` mixes with each image, reset and
checkpointed with theta: `norm_state` / `load_norm_state`) and `img_stats` (the current
image's statistics from the last mixed `infer`).
"""

from __future__ import annotations

import numpy as np
import torch

from grata import losses
from grata.errors import GrataError
from grata.models import bn_parameters, flatten_theta, norm_layers, set_norm_mode, theta_layout
from grata.norm import NormSpec, stats_views


def set_tf32(enabled: bool) -> None:
    """TensorFloat-32 in torch's CUDA convolutions (cuDNN, on by default) and matrix
    products: off unless asked for, so "fp32" on a GPU is float32. These are process-wide
    switches; the legacy ones are used because they exist in every supported torch."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


class TorchEngine:
    """Adapts `model` in place; theta is a view of the model's BN parameters.
    Answers as `grata.engine_protocol.Engine` (`device` is "cpu" or "cuda", `torch_device`
    the torch device). On CUDA the convolutions run in float32 unless `tf32` (`set_tf32`)."""

    kind = "torch"
    size = None  # a convolutional model takes any input size

    def __init__(self, model: torch.nn.Module, device: str | torch.device | None = None,
                 tf32: bool = False):
        self.torch_device = torch.device(device) if device is not None else next(
            model.parameters()).device
        self.device = self.torch_device.type
        self.tf32 = bool(tf32) and self.device == "cuda"
        if self.device == "cuda":
            set_tf32(self.tf32)
        self.model = model.to(self.torch_device).eval()
        self.theta = flatten_theta(self.model)
        self.theta0 = self.theta.clone()
        self.params = bn_parameters(self.model)
        self.layout = theta_layout(self.model)
        self.dtype = self.theta.dtype
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self._views = stats_views(self.layout)
        self.stats0 = torch.cat([t.detach().reshape(-1).to(self.dtype)
                                 for _, m in norm_layers(self.model)
                                 for t in (m.running_mean, m.running_var)])
        self.stats = self.stats0.clone()
        self.img_stats = torch.zeros_like(self.stats0)
        self._priors = {"mix": None,  # the running statistics themselves
                        "ema": [(self.stats[mv], self.stats[vv]) for mv, vv in self._views]}

    # array helpers, so methods need not know the backend
    def to_input(self, image: np.ndarray) -> torch.Tensor:
        """[3,S,S] or [1,3,S,S] numpy image -> model input on the engine's device."""
        x = torch.as_tensor(np.asarray(image), dtype=self.dtype)
        return (x[None] if x.dim() == 3 else x).to(self.torch_device)

    @staticmethod
    def to_numpy(x) -> np.ndarray:
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    def zeros(self) -> torch.Tensor:
        return torch.zeros_like(self.theta)

    def copy(self, a: torch.Tensor) -> torch.Tensor:
        return a.detach().clone()

    def assign(self, dst: torch.Tensor, src) -> None:
        with torch.no_grad():
            dst.copy_(torch.as_tensor(src, dtype=dst.dtype, device=dst.device))

    def all_finite(self, *arrays) -> bool:
        """One check (one device sync) over every array and scalar given."""
        flags = [torch.isfinite(torch.as_tensor(a, device=self.torch_device)).all()
                 for a in arrays]
        return bool(torch.stack(flags).all())

    def scalar(self):
        """A device scalar for results the host reads later (None on the CPU)."""
        return torch.zeros(1, dtype=torch.float32, device=self.torch_device) \
            if self.device == "cuda" else None

    # the stream statistics (ema): part of the adapted state
    def norm_state(self) -> np.ndarray:
        """A host copy of the stream statistics (float32, theta's layout)."""
        return self.stats.detach().cpu().numpy().astype(np.float32)

    def load_norm_state(self, stats) -> None:
        a = np.asarray(stats, dtype=np.float32)
        if a.shape != tuple(self.stats.shape):
            raise GrataError(f"stream statistics of shape {a.shape}, expected "
                             f"{tuple(self.stats.shape)}")
        self.assign(self.stats, a)

    def _set_norm(self, norm) -> NormSpec:
        spec = NormSpec(norm)
        if spec.kind in ("mix", "ema"):
            set_norm_mode(self.model, "mix", spec.alpha, self._priors[spec.kind])
        else:
            set_norm_mode(self.model, "running" if spec.kind == "source" else "sample")
        return spec

    # the three questions
    @torch.no_grad()
    def infer(self, x: torch.Tensor, norm: str = "sample") -> torch.Tensor:
        spec = self._set_norm(norm)
        out = self.model(x)
        if spec.kind in ("mix", "ema"):
            for (mv, vv), (_, m) in zip(self._views, norm_layers(self.model)):
                self.img_stats[mv] = m.img_stats[0][0]
                self.img_stats[vv] = m.img_stats[1][0]
        return out

    def _grad(self, loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, self.params)
        return torch.cat([g.reshape(-1) for g in grads])

    def entropy_grad(self, x: torch.Tensor, norm: str = "sample"):
        self._set_norm(norm)
        with torch.enable_grad():
            loss = losses.entropy_loss(self.model(x))
            return loss.detach(), self._grad(loss)

    def consistency_grad(self, x: torch.Tensor, strong: torch.Tensor, norm: str = "sample"):
        self._set_norm(norm)
        with torch.no_grad():  # the teacher: 6 views in one per-sample-normalised batch
            target = losses.teacher_target(self.model(losses.teacher_batch(x)))
        with torch.enable_grad():
            loss = losses.consistency_loss(self.model(strong), target)
            return loss.detach(), self._grad(loss)

"""The PyTorch reference engine: forward passes and BN-affine gradients of one model.

An engine owns theta (the flat vector of every BN gamma/beta) and answers the three
questions every method asks: the logits, the entropy gradient and the consistency
gradient at the current theta. `grata.runtime.OrtEngine` answers the same questions
with ONNX graphs, so the methods run unchanged on either.
"""

from __future__ import annotations

import numpy as np
import torch

from . import losses
from .models import bn_parameters, flatten_theta, set_norm_mode, theta_layout


class TorchEngine:
    """Adapts `model` in place; theta is a view of the model's BN parameters.
    Answers as `grata.engine.Engine` (`device` is "cpu" or "cuda", `torch_device` the
    torch device)."""

    kind = "torch"

    def __init__(self, model: torch.nn.Module, device: str | torch.device | None = None):
        self.torch_device = torch.device(device) if device is not None else next(
            model.parameters()).device
        self.device = self.torch_device.type
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

    # the three questions
    @torch.no_grad()
    def infer(self, x: torch.Tensor, norm: str = "sample") -> torch.Tensor:
        set_norm_mode(self.model, norm)
        return self.model(x)

    def _grad(self, loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, self.params)
        return torch.cat([g.reshape(-1) for g in grads])

    def entropy_grad(self, x: torch.Tensor):
        set_norm_mode(self.model, "sample")
        with torch.enable_grad():
            loss = losses.entropy_loss(self.model(x))
            return loss.detach(), self._grad(loss)

    def consistency_grad(self, x: torch.Tensor, strong: torch.Tensor):
        set_norm_mode(self.model, "sample")
        with torch.no_grad():  # the teacher: 6 views in one per-sample-normalised batch
            target = losses.teacher_target(self.model(losses.teacher_batch(x)))
        with torch.enable_grad():
            loss = losses.consistency_loss(self.model(strong), target)
            return loss.detach(), self._grad(loss)

"""GraTa per image in the structure of the authors' PyTorch code: the timing baseline.

Same mathematics as `grata.methods.GraTa` (tests check one step matches), but laid out
as the reference implementation runs it: the entropy loss backward into per-parameter
``.grad`` tensors, theta perturbed tensor by tensor, the six teacher views as six
separate batch-1 forward passes under ``no_grad``, the student forward and backward,
theta restored, the cosine assembled from per-tensor dot products and norms, and a
``torch.optim.Adam`` step at the cosine-scaled learning rate, then the final forward.
Per image: 9 forward passes and 2 backward passes (input gradients only: the
convolution weights are frozen).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from grata.augment import strong_augment
from grata.losses import VIEWS, entropy_loss
from grata.models import bn_parameters, set_norm_mode


class AuthorsGraTa:
    """Adapts `model` (a ResUnet, changed in place) one image at a time."""

    def __init__(self, model: torch.nn.Module, beta: float = 1e-4, betas=(0.9, 0.999),
                 eps: float = 1e-8, seed: int = 0):
        self.model = model.eval()
        set_norm_mode(model, "sample")  # BN train mode at batch 1: the image's statistics
        self.params = bn_parameters(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self.beta = beta
        self.optimizer = torch.optim.Adam(self.params, lr=beta, betas=betas, eps=eps,
                                          weight_decay=0)
        self.rng = np.random.default_rng(seed)
        self.last: dict[str, float] = {}

    def adapt(self, image: np.ndarray, strong: np.ndarray | None = None) -> torch.Tensor:
        """One GraTa step on a [3,S,S] image, then its logits [1,2,S,S]."""
        model, params = self.model, self.params
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        if strong is None:
            strong = strong_augment(image, self.rng)
        xs = torch.from_numpy(np.ascontiguousarray(strong, dtype=np.float32))[None]

        # auxiliary (entropy) gradient at theta
        self.optimizer.zero_grad(set_to_none=True)
        loss_a = entropy_loss(model(x))
        loss_a.backward()
        g_a = [p.grad.detach().clone() for p in params]

        # perturb: theta' = theta - g_a
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, g_a):
                p.sub_(g)

            # teacher: six separate batch-1 passes, each mapped back, then averaged
            maps = [inv(torch.sigmoid(model(fwd(x)))) for fwd, inv in VIEWS]
            target = torch.stack(maps, 0).mean(0)

        # student (pseudo) gradient at theta'
        self.optimizer.zero_grad(set_to_none=True)
        loss_p = F.binary_cross_entropy_with_logits(model(xs), target)
        loss_p.backward()
        g_p = [p.grad.detach().clone() for p in params]

        # restore theta
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)

        # cosine over all BN parameters, assembled tensor by tensor
        dot = sum((a * b).sum() for a, b in zip(g_p, g_a))
        n_p = torch.sqrt(sum((a * a).sum() for a in g_p))
        n_a = torch.sqrt(sum((b * b).sum() for b in g_a))
        cos = float(dot / (n_p * n_a + 1e-12))
        lr = self.beta * (cos + 1.0) ** 2 / 4.0
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for p, g in zip(params, g_p):
            p.grad = g
        self.optimizer.step()
        self.last = {"loss_ent": float(loss_a.detach()), "loss_con": float(loss_p.detach()),
                     "cos": cos}

        with torch.no_grad():
            return model(x)

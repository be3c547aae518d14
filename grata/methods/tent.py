"""TENT: Adam on the BN affine parameters, minimising the prediction's entropy."""

from grata.kernels import adam_update
from grata.methods.base import Method


class Tent(Method):
    name = "tent"
    updates = True

    def __init__(self, engine, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8, **kw):
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        super().__init__(engine, **kw)

    def step(self, x, strong) -> None:
        e = self.engine
        loss, g = e.entropy_grad(x, **self.norm_kw)
        self.last = {"loss_ent": loss}
        self.t += 1
        adam_update(e.theta, self.m, self.v, g, self.t, self.lr, self.betas, self.eps)

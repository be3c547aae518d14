"""GraTa: gradient alignment between an entropy and a consistency gradient.

g_a = grad of the entropy at theta; g_p = grad of the consistency loss at
theta' = theta - g_a (at theta without alignment); Adam steps theta with g_p at
eta = beta * (cos(g_p, g_a) + 1)^2 / 4 (eta = beta with a fixed learning rate).
"""

from grata.kernels import adam_update, grata_update
from grata.methods.base import Method


class GraTa(Method):
    name = "grata"
    updates = True
    needs_strong = True
    align = True
    dynamic_lr = True

    def __init__(self, engine, beta: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8, **kw):
        self.beta, self.betas, self.eps = beta, tuple(betas), eps
        super().__init__(engine, **kw)

    def step(self, x, strong) -> None:
        e = self.engine
        loss_a, g_a = e.entropy_grad(x, **self.norm_kw)
        if self.align:
            saved = e.copy(e.theta)
            e.theta -= g_a  # theta' = theta - g_a: step size exactly 1
            loss_p, g_p = e.consistency_grad(x, strong, **self.norm_kw)
            e.assign(e.theta, saved)
        else:
            loss_p, g_p = e.consistency_grad(x, strong, **self.norm_kw)
        self.t += 1
        if self.dynamic_lr:
            # On a GPU cos lands in a device scalar, so nothing waits for it here.
            out = e.scalar()
            cos = grata_update(e.theta, self.m, self.v, g_p, g_a, self.t, self.beta,
                               self.betas, self.eps, **({} if out is None else {"cos_out": out}))
            cos = out if out is not None else cos
        else:
            cos = (g_p * g_a).sum() / ((g_p * g_p).sum() ** 0.5 * (g_a * g_a).sum() ** 0.5
                                       + 1e-12)
            adam_update(e.theta, self.m, self.v, g_p, self.t, self.beta, self.betas, self.eps)
        self.last = {"loss_ent": loss_a, "loss_con": loss_p, "cos": cos}


class GraTaNoAlign(GraTa):
    name = "grata-noalign"
    align = False


class GraTaFixedLR(GraTa):
    name = "grata-fixedlr"
    dynamic_lr = False

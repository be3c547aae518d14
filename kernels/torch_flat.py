"""Flat parameter and gradient buffers for torch: what the fused kernel works on.

``FlatParams(params)`` moves the given parameters (the BN gammas and betas) into one
contiguous vector ``theta`` (each parameter becomes a view of it) and gives them gradient
buffers that are views of flat vectors as well: backward accumulates into them in place,
so after ``loss.backward()`` the flat gradient is ready with no gather (no torch.cat, no
per-tensor copies). Two gradient buffers let GraTa keep g_a while the second backward
writes g_p: ``use_grad(0)`` before the entropy backward, ``use_grad(1)`` before the
consistency backward.

Works on any device; imports torch lazily (the package itself does not need torch).
"""

from __future__ import annotations

__all__ = ["FlatParams"]


class FlatParams:
    def __init__(self, params, n_grads: int = 2):
        import torch

        self.params = list(params)
        if not self.params:
            raise ValueError("no parameters to flatten")
        dev, dtype = self.params[0].device, self.params[0].dtype
        for p in self.params:
            if p.device != dev or p.dtype != dtype:
                raise ValueError("all parameters must share one device and dtype")
        self.sizes = [p.numel() for p in self.params]
        self.n = sum(self.sizes)
        self.theta = torch.empty(self.n, device=dev, dtype=dtype)
        self.offsets = []
        off = 0
        with torch.no_grad():
            for p, k in zip(self.params, self.sizes):
                self.theta[off:off + k].copy_(p.detach().reshape(-1))
                p.data = self.theta[off:off + k].view_as(p)
                self.offsets.append(off)
                off += k
        self.grads = [torch.zeros(self.n, device=dev, dtype=dtype) for _ in range(n_grads)]
        self.m = torch.zeros(self.n, device=dev, dtype=dtype)
        self.v = torch.zeros(self.n, device=dev, dtype=dtype)
        self.active = -1
        self.use_grad(0)

    def use_grad(self, k: int, zero: bool = True):
        """Point every parameter's .grad at a view of gradient buffer k (zeroed first)."""
        buf = self.grads[k]
        if zero:
            buf.zero_()
        for p, off, size in zip(self.params, self.offsets, self.sizes):
            p.grad = buf[off:off + size].view_as(p)
        self.active = k
        return buf

    def check_views(self) -> bool:
        """True when every parameter and its .grad still alias the flat buffers (an
        optimizer or a load_state_dict that replaces tensors breaks this)."""
        buf = self.grads[self.active]
        for p, off in zip(self.params, self.offsets):
            if p.data_ptr() != self.theta[off:].data_ptr():
                return False
            if p.grad is None or p.grad.data_ptr() != buf[off:].data_ptr():
                return False
        return True

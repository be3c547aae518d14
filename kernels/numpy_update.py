"""GraTa and Adam parameter updates in numpy: the CPU path, and the CUDA kernel's reference.

Semantics (shared with ``grata_update.cu``), for flat 1-D arrays of one float dtype:

    cos   = <g_p, g_a> / (||g_p|| * ||g_a|| + 1e-12)       sums accumulated in float64
    eta   = beta * (cos + 1)^2 / 4
    m     = b1 * m + (1 - b1) * g_p
    v     = b2 * v + (1 - b2) * g_p^2
    theta = theta - eta / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

which is torch.optim.Adam's update (no weight decay) with the learning rate eta; ``t`` is
the 1-based step number *after* the increment (the first update passes 1). The plain Adam
update (TENT) is the same with a fixed learning rate. Everything is in place; the
elementwise arithmetic runs in the arrays' own dtype (float32 or float64), the scalars
(bias corrections, step size) are formed in float64 first, as torch does.

The reductions are deterministic: products are formed in float64 and summed by numpy's
pairwise summation, whose order depends only on the length (no BLAS, no threads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["adam_update", "alignment", "check_step", "grata_update", "lr_from_cos"]

COS_EPS = 1e-12  # the denominator's guard in cos, from the method's definition


def check_step(step) -> int:
    """The Adam step (1-based, after increment) as an int; ValueError when it is not >= 1."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise ValueError(  # noqa: TRY004  (the API's contract: ValueError for bad input)
            f"step must be an integer >= 1 (the 1-based Adam step), got {step!r}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (the 1-based Adam step after increment), got {step}")
    return int(step)


def check_betas(betas: Sequence[float], eps: float) -> tuple[float, float]:
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be two numbers, got {betas!r}") from None
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got ({b1}, {b2})")
    if not (float(eps) >= 0.0):
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    return b1, b2


def lr_from_cos(cos: float, beta: float) -> float:
    """GraTa's dynamic learning rate: beta * (cos + 1)^2 / 4."""
    return beta * (cos + 1.0) * (cos + 1.0) / 4.0


def _check_arrays(named_out: dict, named_in: dict) -> tuple[int, np.dtype]:
    """Validate the arrays of one update; returns (length, dtype)."""
    arrays = {**named_out, **named_in}
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray):
            raise ValueError(  # noqa: TRY004  (the API's contract: ValueError for bad input)
                f"{name} must be a numpy array, got {type(a).__name__}")
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D (the flat parameter vector), got shape {a.shape}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be contiguous")
        if a.dtype not in (np.float32, np.float64):
            raise ValueError(f"{name} must be float32 or float64, got {a.dtype}")
    first = next(iter(arrays))
    n, dtype = arrays[first].shape[0], arrays[first].dtype
    for name, a in arrays.items():
        if a.shape[0] != n:
            raise ValueError(f"{name} has {a.shape[0]} elements, {first} has {n}: same length needed")
        if a.dtype != dtype:
            raise ValueError(f"{name} is {a.dtype}, {first} is {dtype}: one dtype needed")
    for name, a in named_out.items():
        if not a.flags.writeable:
            raise ValueError(f"{name} is updated in place and must be writeable")
    # The outputs must not alias each other nor the gradients (the gradients may alias
    # each other: both are only read).
    outs = list(named_out.items())
    for i, (name, a) in enumerate(outs):
        for other, b in outs[i + 1:] + list(named_in.items()):
            if n and np.may_share_memory(a, b):
                raise ValueError(f"{name} and {other} overlap in memory")
    return n, dtype


def alignment(g_p: np.ndarray, g_a: np.ndarray) -> float:
    """cos between the two gradients, as in the method (float64 sums, fixed order)."""
    p = np.asarray(g_p, dtype=np.float64).ravel()
    a = np.asarray(g_a, dtype=np.float64).ravel()
    if p.shape != a.shape:
        raise ValueError(f"g_p has {p.size} elements, g_a has {a.size}: same length needed")
    pa = float(np.add.reduce(p * a))
    pp = float(np.add.reduce(p * p))
    aa = float(np.add.reduce(a * a))
    return pa / (math.sqrt(pp) * math.sqrt(aa) + COS_EPS)


def _adam_inplace(theta, m, v, g, step: int, lr: float, b1: float, b2: float, eps: float):
    bc1 = 1.0 - b1**step
    bc2_sqrt = math.sqrt(1.0 - b2**step)
    step_size = lr / bc1
    dtype = theta.dtype.type
    tmp = np.multiply(g, dtype(1.0 - b1), dtype=theta.dtype)
    m *= dtype(b1)
    m += tmp
    np.multiply(g, g, out=tmp)
    tmp *= dtype(1.0 - b2)
    v *= dtype(b2)
    v += tmp
    np.sqrt(v, out=tmp)
    tmp /= dtype(bc2_sqrt)
    tmp += dtype(eps)
    np.divide(m, tmp, out=tmp)
    tmp *= dtype(step_size)
    theta -= tmp


def grata_update(theta, m, v, g_p, g_a, step, beta, betas=(0.9, 0.999), eps=1e-8, *,
                 cos_out=None):
    """One GraTa step in place on theta, m, v. Returns cos as a float.

    With ``cos_out`` (a 1-element or longer float array) cos is also written to
    ``cos_out[0]`` and None is returned, like the device path that avoids a sync.
    """
    step = check_step(step)
    b1, b2 = check_betas(betas, eps)
    _check_arrays({"theta": theta, "m": m, "v": v}, {"g_p": g_p, "g_a": g_a})
    cos = alignment(g_p, g_a)
    _adam_inplace(theta, m, v, g_p, step, lr_from_cos(cos, float(beta)), b1, b2, float(eps))
    if cos_out is not None:
        cos_out[0] = cos
        return None
    return cos


def adam_update(theta, m, v, g, step, lr, betas=(0.9, 0.999), eps=1e-8) -> None:
    """One Adam step (torch.optim.Adam's rule, no weight decay) in place on theta, m, v."""
    step = check_step(step)
    b1, b2 = check_betas(betas, eps)
    _check_arrays({"theta": theta, "m": m, "v": v}, {"g": g})
    _adam_inplace(theta, m, v, g, step, float(lr), b1, b2, float(eps))

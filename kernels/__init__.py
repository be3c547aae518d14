"""Parameter-update kernels: GraTa's aligned, dynamic-learning-rate Adam step, and plain Adam.

Two entry points, the same semantics on every backend (see ``numpy_update``):

    cos = grata_update(theta, m, v, g_p, g_a, step, beta, betas=(0.9, 0.999), eps=1e-8)
    adam_update(theta, m, v, g, step, lr, betas=(0.9, 0.999), eps=1e-8)

All arrays are flat (1-D) and updated in place; ``step`` is the 1-based Adam step after
the increment. Dispatch on the arrays:

* numpy arrays (float32 or float64) -> the numpy implementation;
* torch CPU tensors -> the numpy implementation on ``.numpy()`` views (still in place);
* objects with ``__cuda_array_interface__`` (torch CUDA tensors, CuPy arrays,
  ``DeviceArray``) -> the fused CUDA kernel (float32), compiled at run time with NVRTC
  (needs the ``gpu`` extra). Keyword ``stream=`` picks the stream, ``cos_out=`` (a float32
  device array) makes ``grata_update`` return None without waiting for the device.

Importing this package never imports torch, cuda-python or onnxruntime.
"""

from __future__ import annotations

from grata.kernels.numpy_update import alignment, lr_from_cos
import numpy as np
from grata.kernels import numpy_update
from grata.kernels import cuda_update

__all__ = ["adam_update", "alignment", "backend_of", "grata_update", "lr_from_cos"]


def _is_torch_tensor(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "is_cuda")


def _host_view(x):
    """A numpy view of x when x lives in host memory, else None."""

    if isinstance(x, np.ndarray):
        return x
    if _is_torch_tensor(x) and not x.is_cuda and x.device.type == "cpu":
        return x.detach().numpy()
    return None


def _is_device(x) -> bool:
    if _is_torch_tensor(x):
        return bool(x.is_cuda)
    return hasattr(x, "__cuda_array_interface__")


def backend_of(*arrays) -> str:
    """"numpy" or "cuda" for a set of arrays; ValueError when they mix or are unknown."""
    kinds = set()
    for a in arrays:
        if a is None:
            continue
        if _host_view(a) is not None:
            kinds.add("numpy")
        elif _is_device(a):
            kinds.add("cuda")
        else:
            raise ValueError(f"unsupported array type {type(a).__name__}: use numpy arrays, "
                             "torch tensors or CUDA arrays (__cuda_array_interface__)")
    if len(kinds) > 1:
        raise ValueError("host and device arrays mixed in one update")
    return kinds.pop() if kinds else "numpy"


def grata_update(theta, m, v, g_p, g_a, step, beta, betas=(0.9, 0.999), eps=1e-8, *,
                 cos_out=None, **device_options):
    """One GraTa step in place (see the module doc). Returns cos, or None with cos_out."""
    if backend_of(theta, m, v, g_p, g_a, cos_out) == "cuda":

        return cuda_update.grata_update(theta, m, v, g_p, g_a, step, beta, betas, eps,
                                        cos_out=cos_out, **device_options)
    if device_options:
        raise ValueError(f"options {sorted(device_options)} only apply to device arrays")

    views = [_host_view(a) for a in (theta, m, v, g_p, g_a)]
    out = _host_view(cos_out) if cos_out is not None else None
    return numpy_update.grata_update(*views, step, beta, betas, eps, cos_out=out)


def adam_update(theta, m, v, g, step, lr, betas=(0.9, 0.999), eps=1e-8, **device_options):
    """One Adam step (torch.optim.Adam's rule, no weight decay) in place. Returns None."""
    if backend_of(theta, m, v, g) == "cuda":

        return cuda_update.adam_update(theta, m, v, g, step, lr, betas, eps, **device_options)
    if device_options:
        raise ValueError(f"options {sorted(device_options)} only apply to device arrays")

    views = [_host_view(a) for a in (theta, m, v, g)]
    return numpy_update.adam_update(*views, step, lr, betas, eps)

"""The device engine: GraTa's three questions answered by ONNX graphs on onnxruntime.

Needs numpy and onnxruntime only (never torch). theta is a flat float32 numpy vector
fed to every graph; the update itself is `grata.kernels` (numpy on a CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import GrataError
from ..export.manifest import load_manifest
from ..export.session import session_options

PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                          "CPUExecutionProvider"]}


def _onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError:
        raise GrataError("the onnx backend needs onnxruntime: pip install "
                         "'grata-edge[device]'") from None
    return ort


class OrtEngine:
    """Loads (and verifies) an artifact folder; same interface as `TorchEngine`."""

    backend = "onnx"

    def __init__(self, artifacts, device: str = "cpu", threads: int | None = None,
                 verify: bool = True):
        ort = _onnxruntime()
        self.folder = Path(artifacts)
        self.manifest = m = load_manifest(self.folder, verify=verify)
        if device not in PROVIDERS:
            raise GrataError(f"unknown device {device!r}; choose from {', '.join(PROVIDERS)}")
        wanted = PROVIDERS[device]
        if wanted[0] not in ort.get_available_providers():
            raise GrataError(f"device {device!r} needs onnxruntime's {wanted[0]}, which this "
                             f"onnxruntime lacks (has: {', '.join(ort.get_available_providers())})")
        self.size = int(m["size"])
        self.layout = m["params"]
        self.theta0 = np.load(self.folder / m["theta0"]).astype(np.float32)
        if self.theta0.shape != (m["n_theta"],):
            raise GrataError(f"artifact {self.folder}: theta0 has shape {self.theta0.shape}, "
                             f"manifest says {m['n_theta']}")
        self.theta = self.theta0.copy()
        self.dtype = np.float32
        opts = session_options(threads)
        self.sessions = {role: ort.InferenceSession(str(self.folder / f), sess_options=opts,
                                                    providers=wanted)
                         for role, f in m["graphs"].items()}

    # array helpers
    def to_input(self, image) -> np.ndarray:
        x = np.asarray(image, dtype=np.float32)
        x = x[None] if x.ndim == 3 else x
        if x.shape != (1, 3, self.size, self.size):
            raise GrataError(f"the artifacts take images of 1x3x{self.size}x{self.size}, "
                             f"not {'x'.join(map(str, x.shape))}; export again with --size")
        return np.ascontiguousarray(x)

    @staticmethod
    def to_numpy(x) -> np.ndarray:
        return np.asarray(x)

    def zeros(self) -> np.ndarray:
        return np.zeros_like(self.theta)

    @staticmethod
    def copy(a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True)

    @staticmethod
    def assign(dst: np.ndarray, src) -> None:
        dst[...] = src

    @staticmethod
    def all_finite(*arrays) -> bool:
        return all(bool(np.isfinite(a).all()) for a in arrays)

    @staticmethod
    def scalar():
        return None

    # the three questions
    def infer(self, x: np.ndarray, norm: str = "sample") -> np.ndarray:
        role = "infer" if norm == "sample" else "infer_source"
        if role not in self.sessions:
            raise GrataError(f"artifact {self.folder} has no {role!r} graph (needed for "
                             f"norm={norm!r}); export again with this version")
        return self.sessions[role].run(["logits"], {"image": x, "theta": self.theta})[0]

    def entropy_grad(self, x: np.ndarray):
        loss, grad = self.sessions["entropy_grad"].run(
            ["loss", "grad"], {"image": x, "theta": self.theta})
        return float(loss), grad

    def consistency_grad(self, x: np.ndarray, strong: np.ndarray):
        loss, grad = self.sessions["consistency_grad"].run(
            ["loss", "grad"], {"image": x, "strong_image": strong, "theta": self.theta})
        return float(loss), grad


def open_engine(artifacts, device: str = "cpu", threads: int | None = None,
                verify: bool = True):
    """The engine for `device`: on "cuda" `CudaEngine` (theta, moments and gradients stay
    on the GPU), otherwise `OrtEngine`."""
    if device == "cuda":
        from .cuda_engine import CudaEngine

        return CudaEngine(artifacts, threads=threads, verify=verify)
    return OrtEngine(artifacts, device=device, threads=threads, verify=verify)

"""The device engine: GraTa's three questions answered by ONNX graphs on onnxruntime.

Needs numpy and onnxruntime only (never torch). theta is a flat float32 numpy vector
fed to every graph; the update itself is `grata.kernels` (numpy on a CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import GrataError
from ..export.manifest import load_manifest
from .ort_session import import_onnxruntime, open_sessions, provider_list, tuned_options


def check_input(image, size: int) -> np.ndarray:
    """A [3,S,S] or [1,3,S,S] image -> a contiguous float32 [1,3,S,S] host array, or a
    one-line error naming the size the artifacts take."""
    x = np.asarray(image, dtype=np.float32)
    x = x[None] if x.ndim == 3 else x
    if x.shape != (1, 3, size, size):
        raise GrataError(f"the artifacts take images of 1x3x{size}x{size}, "
                         f"not {'x'.join(map(str, x.shape))}; export again with --size")
    return np.ascontiguousarray(x)


def load_theta0(folder: Path, manifest: dict) -> np.ndarray:
    """The artifacts' source theta (float32), checked against the manifest's length."""
    theta0 = np.load(folder / manifest["theta0"]).astype(np.float32)
    if theta0.shape != (manifest["n_theta"],):
        raise GrataError(f"artifact {folder}: theta0 has shape {theta0.shape}, "
                         f"manifest says {manifest['n_theta']}")
    return theta0


class OrtEngine:
    """Loads (and verifies) an artifact folder; answers as `grata.engine.Engine`.

    `device` picks onnxruntime's providers (cpu, cuda, or tensorrt: the TensorRT
    execution provider at `precision`, engines cached in `cache_dir`); theta and the
    moments stay numpy arrays on the host. `tuning` (keys of
    `grata.runtime.ort_session.TUNING`) changes the session settings for measurements.
    """

    kind = "onnx"

    def __init__(self, artifacts, device: str = "cpu", threads: int | None = None,
                 verify: bool = True, *, precision: str = "fp32", cache_dir=None,
                 tuning: dict | None = None):
        import_onnxruntime()
        self.folder = Path(artifacts)
        self.manifest = m = load_manifest(self.folder, verify=verify)
        providers = provider_list(device, precision, cache_dir)
        # where the arrays live is the host; the graphs run on `providers`
        self.device = "cuda" if device in ("cuda", "tensorrt") else "cpu"
        self.size = int(m["size"])
        self.layout = m["params"]
        self.theta0 = load_theta0(self.folder, m)
        self.theta = self.theta0.copy()
        self.dtype = np.float32
        opts, roles, share = tuned_options(threads, tuning)
        graphs = m["graphs"] if roles == "all" else \
            {r: f for r, f in m["graphs"].items() if r != "infer_source"}
        self.sessions, self._shared = open_sessions(self.folder, graphs, providers, opts,
                                                    share)

    # array helpers
    def to_input(self, image) -> np.ndarray:
        return check_input(image, self.size)

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


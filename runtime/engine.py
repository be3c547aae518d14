"""The device engine: GraTa's three questions answered by ONNX graphs on onnxruntime.

Needs numpy and onnxruntime only (never torch). theta is a flat float32 numpy vector
fed to every graph; the update itself is `grata.kernels` (numpy on a CPU).

Each question takes the BN statistics rule `norm` (`grata.norm`): ``sample`` runs the
plain graphs, ``source`` ``infer_source`` (and the mixed gradient graphs at a = 0),
``mix`` and ``ema`` the mixed graphs fed `stats0` (the stored statistics) or `stats` (the
stream estimate) and the weight. The mixed graphs' sessions open on first use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import GrataError
from ..export.manifest import load_manifest
from ..export.session import session_options
from ..norm import NormSpec

PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                          "CPUExecutionProvider"]}


MIXED = {"infer": "infer_mix", "entropy_grad": "entropy_grad_mix",
         "consistency_grad": "consistency_grad_mix"}


def route(engine, role: str, norm) -> tuple[str, NormSpec]:
    """The graph that answers `role` under `norm`, and the parsed rule; a graph the
    artifacts lack is a one-line `GrataError`."""
    spec = NormSpec(norm)
    if spec.kind == "source" and role == "infer":
        graph = "infer_source"
    else:
        graph = role if spec.kind == "sample" else MIXED[role]
    if graph not in engine.manifest["graphs"] or (
            graph.endswith("_mix") and getattr(engine, "stats0", None) is None):
        raise GrataError(f"artifact {engine.folder} has no {graph!r} graph (needed for "
                         f"norm {str(spec)!r}); export again with this version")
    return graph, spec


def load_stats0(folder: Path, manifest: dict) -> np.ndarray | None:
    """The stored running statistics of an artifact folder (None before they existed)."""
    if "stats0" not in manifest:
        return None
    stats0 = np.load(folder / manifest["stats0"]).astype(np.float32)
    if stats0.shape != (manifest["n_theta"],):
        raise GrataError(f"artifact {folder}: stats0 has shape {stats0.shape}, manifest "
                         f"says {manifest['n_theta']}")
    return stats0


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
        self.stats0 = load_stats0(self.folder, m)
        self.stats = None if self.stats0 is None else self.stats0.copy()
        self.img_stats = None if self.stats0 is None else np.zeros_like(self.stats0)
        opts = session_options(threads)
        self._open = lambda role: ort.InferenceSession(
            str(self.folder / m["graphs"][role]), sess_options=opts, providers=wanted)
        self.sessions = {role: self._open(role) for role in m["graphs"]
                         if role not in MIXED.values()}

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

    # the stream statistics (ema): part of the adapted state
    def norm_state(self) -> np.ndarray:
        """A copy of the stream statistics (float32, theta's layout)."""
        if self.stats is None:
            raise GrataError(f"artifact {self.folder} has no stream statistics; export again "
                             f"with this version")
        return np.array(self.to_numpy(self.stats), dtype=np.float32)

    def load_norm_state(self, stats) -> None:
        a = np.asarray(stats, dtype=np.float32)
        if self.stats is None or a.shape != self.stats.shape:
            raise GrataError(f"stream statistics of shape {a.shape} do not fit artifact "
                             f"{self.folder}")
        self.assign(self.stats, a)

    def _feeds(self, role: str, norm, **feeds):
        """(session, feeds) for `role` under `norm`."""
        graph, spec = route(self, role, norm)
        if graph not in self.sessions:
            self.sessions[graph] = self._open(graph)
        if graph.endswith("_mix"):
            feeds["stats"] = self.stats if spec.kind == "ema" else self.stats0
            feeds["alpha"] = np.array([spec.alpha], np.float32)
        return self.sessions[graph], feeds

    # the three questions
    def infer(self, x: np.ndarray, norm: str = "sample") -> np.ndarray:
        sess, feeds = self._feeds("infer", norm, image=x, theta=self.theta)
        if "alpha" not in feeds:
            return sess.run(["logits"], feeds)[0]
        logits, self.img_stats[...] = sess.run(["logits", "img_stats"], feeds)
        return logits

    def entropy_grad(self, x: np.ndarray, norm: str = "sample"):
        sess, feeds = self._feeds("entropy_grad", norm, image=x, theta=self.theta)
        loss, grad = sess.run(["loss", "grad"], feeds)
        return float(loss), grad

    def consistency_grad(self, x: np.ndarray, strong: np.ndarray, norm: str = "sample"):
        sess, feeds = self._feeds("consistency_grad", norm, image=x, strong_image=strong,
                                  theta=self.theta)
        loss, grad = sess.run(["loss", "grad"], feeds)
        return float(loss), grad


def open_engine(artifacts, device: str = "cpu", threads: int | None = None,
                verify: bool = True):
    """The engine for `device`: on "cuda" `CudaEngine` (theta, moments and gradients stay
    on the GPU), otherwise `OrtEngine`."""
    if device == "cuda":
        from .cuda_engine import CudaEngine

        return CudaEngine(artifacts, threads=threads, verify=verify)
    return OrtEngine(artifacts, device=device, threads=threads, verify=verify)

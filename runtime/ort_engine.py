"""The onnxruntime engine: GraTa's three questions answered by ONNX graphs on onnxruntime.

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

from grata.errors import GrataError
from grata.export.manifest import load_manifest
from grata.norm import NormSpec
from grata.runtime.ort_session import engine_sessions, import_onnxruntime, provider_list

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


class StreamStatistics:
    """The stream statistics (``ema``) of an ONNX engine, part of the adapted state:
    `stats` (theta's layout) where the artifacts have mixed-statistics graphs."""

    def norm_state(self) -> np.ndarray:
        """A host copy of the stream statistics (float32, theta's layout)."""
        if self.stats is None:
            raise GrataError(f"artifact {self.folder} has no stream statistics; export again "
                             f"with this version")
        return np.array(self.to_numpy(self.stats), dtype=np.float32)

    def load_norm_state(self, stats) -> None:
        a = np.asarray(stats, dtype=np.float32)
        if self.stats is None or a.shape != tuple(self.stats.shape):
            raise GrataError(f"stream statistics of shape {a.shape} do not fit artifact "
                             f"{self.folder}")
        self.assign(self.stats, a)


class OrtEngine(StreamStatistics):
    """Loads (and verifies) an artifact folder; answers as `grata.engine_protocol.Engine`.

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
        self.stats0 = load_stats0(self.folder, m)
        self.stats = None if self.stats0 is None else self.stats0.copy()
        self.img_stats = None if self.stats0 is None else np.zeros_like(self.stats0)
        # the frozen weights once for all graphs; infer_source and the mixed-statistics
        # graphs open on first use, so nothing extra loads for `sample`
        self.sessions = engine_sessions(self.folder, m, providers, threads, tuning)

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


    def _feeds(self, role: str, norm, **feeds):
        """(session, feeds) for `role` under `norm`."""
        graph, spec = route(self, role, norm)
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


"""Predictors behind one small interface: ``predict(image, theta) -> logits``.

A predictor answers one question: the logits of an image at a given theta (the
flat BN gamma/beta vector the methods adapt). It never adapts; the gradient graphs stay
with the engine. Predictors:

- ``onnxruntime``: the artifact folder's ``infer`` graph on onnxruntime (CPU; the CUDA
  and TensorRT execution providers where this onnxruntime has them). The default where
  TensorRT is absent.
- ``tensorrt``: a TensorRT engine built once from the same graph with theta as an input
  tensor (``grata.runtime.tensorrt``); needs the ``tensorrt`` package and a GPU.
- ``auto``: ``tensorrt`` where the ``tensorrt`` package is installed and an engine can be
  made, else ``onnxruntime`` (the reason is kept in ``fallback``).

Given the engine that adapts (`make_predictor(..., engine=)`) and that engine keeps theta
on the GPU (`CudaEngine`), the predictor takes theta where it is: ``onnxruntime`` runs the
engine's own graph through its IOBinding (`device_predictor`), ``tensorrt`` binds theta's
device address and runs on the engine's stream. theta never goes through the host.

Precision: ``fp32`` is float32 everywhere (no TensorFloat-32: onnxruntime's CUDA
provider gets ``use_tf32=0``, TensorRT's builder has TF32 cleared); ``tf32`` is asked for
by name only (onnxruntime's CUDA provider, or TensorRT) and is recorded as such.

Asking for a predictor that cannot run here is a one-line `GrataError` naming what is
missing, never an import traceback. Importing this module imports neither onnxruntime nor
tensorrt.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from grata.errors import GrataError
from grata.export.manifest import PRECISIONS, load_manifest
from grata.runtime.cuda_engine import cuda_unavailable
from grata.runtime.ort_session import (
    COMPUTE_PRECISIONS,
    available_providers,
    import_onnxruntime,
    provider_list,
    tuned_options,
)
from grata.runtime.tensorrt import TensorRTPredictor

PREDICTORS = ("auto", "onnxruntime", "tensorrt")
# what a predictor may compute in (`grata serve --precision`)
SERVE_PRECISIONS = COMPUTE_PRECISIONS
ORT_DEVICES = ("auto", "cpu", "cuda", "tensorrt")
# graph role per normalisation of the method: current-image statistics or stored ones
GRAPHS = {"sample": "infer", "running": "infer_source", "source": "infer_source"}


@runtime_checkable
class Predictor(Protocol):
    """What serving needs: logits [1, 2, S, S] float32 of image [1, 3, S, S] at theta."""

    name: str         # "onnxruntime" or "tensorrt"
    precision: str    # "fp32", "tf32", "fp16" or "int8"
    size: int         # S
    n_theta: int      # length of theta

    def predict(self, image: np.ndarray, theta: np.ndarray) -> np.ndarray: ...


def _check_inputs(image, theta, size: int, n_theta: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(image, dtype=np.float32)
    t = np.ascontiguousarray(theta, dtype=np.float32)
    if x.shape != (1, 3, size, size):
        raise GrataError(f"predict takes an image of 1x3x{size}x{size}, not "
                         f"{'x'.join(map(str, x.shape))}")
    if t.shape != (n_theta,):
        raise GrataError(f"predict takes theta of {n_theta} values, not shape {t.shape}")
    return x, t


def is_device_array(a) -> bool:
    """Whether `a` lives in GPU memory (CuPy, torch CUDA, anything with the interface)."""
    return hasattr(a, "__cuda_array_interface__")


def resolve_ort_device(device: str) -> str:
    """'auto' -> 'cuda' where the GPU engine can run (onnxruntime's CUDA provider, CuPy and
    a CUDA device: `grata.runtime.cuda_engine.cuda_unavailable`), else 'cpu'."""
    if device not in ORT_DEVICES:
        raise GrataError(f"unknown device {device!r}; choose from {', '.join(ORT_DEVICES)}")
    if device != "auto":
        return device
    import_onnxruntime()
    if "CUDAExecutionProvider" not in available_providers():
        return "cpu"
    return "cuda" if cuda_unavailable() is None else "cpu"


class OrtPredictor:
    """The ``infer`` graph (or ``infer_source``) on onnxruntime.

    Give either an artifact folder (a session is made for the graph, on `device`'s
    execution providers) or an existing `session` with inputs ``image``, ``theta`` and
    output ``logits`` (e.g. ``OrtEngine.sessions["infer"]``, so nothing loads twice).
    """

    name = "onnxruntime"
    precision = "fp32"
    fallback: str | None = None  # why ``auto`` did not pick tensorrt, if it did not

    def __init__(self, artifacts=None, *, session=None, graph: str = "infer",
                 device: str = "cpu", threads: int | None = None, verify: bool = True,
                 precision: str = "fp32"):
        if session is None:
            if artifacts is None:
                raise GrataError("OrtPredictor needs an artifact folder or a session")
            ort = import_onnxruntime()
            wanted = provider_list(resolve_ort_device(device), precision)
            folder = Path(artifacts)
            manifest = load_manifest(folder, verify=verify)
            if graph not in manifest["graphs"]:
                raise GrataError(f"artifact {folder} has no {graph!r} graph; export again")
            # the engine's forward settings: the same graph an engine's `infer` runs
            forward, _ = tuned_options(threads)
            session = ort.InferenceSession(str(folder / manifest["graphs"][graph]),
                                           sess_options=forward(False), providers=wanted)
        shapes = {i.name: i.shape for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        if set(shapes) != {"image", "theta"} or "logits" not in outputs:
            raise GrataError(f"the {graph!r} graph has inputs {sorted(shapes)} and outputs "
                             f"{outputs}; expected image, theta -> logits")
        self.session = session
        self.precision = precision
        self.size = int(shapes["image"][-1])
        self.n_theta = int(shapes["theta"][0])
        self.providers = list(session.get_providers())
        self.detail = f"onnxruntime {self.providers[0]}"

    def predict(self, image: np.ndarray, theta: np.ndarray) -> np.ndarray:
        x, t = _check_inputs(image, theta, self.size, self.n_theta)
        return self.session.run(["logits"], {"image": x, "theta": t})[0]


# the statistics rule under which an engine's own graph answers like a predictor's graph
_GRAPH_NORM = {"infer": "sample", "infer_source": "source"}


class EnginePredictor:
    """Predictions through an engine's own graphs at a given theta, under the statistics
    rule `norm`: for a rule the other predictors do not take (``mix``, ``ema``: the
    engine's mixed graph fed with its statistics), and on an engine that keeps theta on
    the GPU (`CudaEngine`: theta and the image bound by their device addresses on the
    engine's stream, only the logits come back to the host)."""

    name = "onnxruntime"
    precision = "fp32"
    fallback: str | None = None

    def __init__(self, engine, norm, detail: str | None = None):
        self.engine, self.norm = engine, norm
        self.size, self.n_theta = int(engine.size), int(engine.theta0.shape[0])
        self.detail = detail or f"onnxruntime (the engine's infer_mix graph, {norm} statistics)"

    def predict(self, image, theta) -> np.ndarray:
        e = self.engine
        x = image if is_device_array(image) else e.to_input(image)
        if theta is e.theta:
            return e.to_numpy(e.infer(x, norm=self.norm))
        saved = e.copy(e.theta)
        e.assign(e.theta, theta)
        try:
            return e.to_numpy(e.infer(x, norm=self.norm))
        finally:
            e.assign(e.theta, saved)


def device_predictor(engine, graph: str = "infer") -> EnginePredictor:
    """The ``infer`` (or ``infer_source``) graph of an engine that keeps theta on the GPU,
    run by the engine itself."""
    if graph not in _GRAPH_NORM:
        raise GrataError(f"the device predictor runs {', '.join(_GRAPH_NORM)}, not "
                         f"{graph!r}")
    return EnginePredictor(engine, _GRAPH_NORM[graph],
                           f"onnxruntime CUDAExecutionProvider (the engine's {graph} graph, "
                           f"theta on the device)")


def device_engine(engine) -> bool:
    """Whether `engine` keeps theta on the GPU with a stream of its own (`CudaEngine`)."""
    return (engine is not None and getattr(engine, "device", "cpu") == "cuda"
            and getattr(engine, "stream", None) is not None)


def tensorrt_installed() -> bool:
    """Whether the ``tensorrt`` package can be found (without importing it)."""
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        return False


def make_predictor(name: str = "auto", artifacts=None, *, graph: str = "infer",
                   device: str = "cpu", threads: int | None = None,
                   precision: str | None = None, session=None, cache_dir=None,
                   calibration=None, verify: bool = True, engine=None) -> Predictor:
    """A predictor by name (see the module docstring).

    `device`, `threads` and `session` concern onnxruntime; `precision` (default: TensorRT's
    `default_precision`, fp32 on onnxruntime), `cache_dir` (default ``$GRATA_CACHE/trt``)
    and `calibration` (images [3,S,S] for int8) concern TensorRT. `engine`: the engine
    that adapts; when it keeps theta on the GPU the predictor takes theta from there.
    """
    if name not in PREDICTORS:
        raise GrataError(f"unknown predictor {name!r}; choose from {', '.join(PREDICTORS)}")
    if precision is not None and precision not in SERVE_PRECISIONS:
        raise GrataError(f"unknown precision {precision!r}; choose from "
                         f"{', '.join(SERVE_PRECISIONS)}")
    on_device = device_engine(engine)
    fallback = None
    if name in ("auto", "tensorrt"):
        if name == "auto" and not tensorrt_installed():
            fallback = "the tensorrt package is not installed"
        else:
            try:
                return TensorRTPredictor(artifacts, precision=precision, graph=graph,
                                         cache_dir=cache_dir, calibration=calibration,
                                         verify=verify,
                                         stream=engine.stream if on_device else None)
            except GrataError as exc:
                if name == "tensorrt":
                    raise
                fallback = str(exc)
    why = f" (tensorrt: {fallback})" if fallback else ""
    if on_device:
        if precision not in (None, "fp32"):
            raise GrataError(f"precision {precision!r} on the GPU engine needs the tensorrt "
                             f"predictor; onnxruntime serves its graphs in fp32{why}")
        predictor = device_predictor(engine, graph)
        predictor.fallback = fallback
        return predictor
    if precision not in (None, "fp32", "tf32"):
        raise GrataError(f"precision {precision!r} needs the tensorrt predictor; onnxruntime "
                         f"serves in fp32 (or tf32 on its CUDA provider){why}")
    if precision == "tf32" and session is not None:
        session = None  # the engine's session computes in fp32: a tf32 one of its own
    predictor = OrtPredictor(artifacts, session=session, graph=graph, device=device,
                             threads=threads, verify=verify, precision=precision or "fp32")
    predictor.fallback = fallback
    return predictor


__all__ = [
    "GRAPHS",
    "PRECISIONS",
    "PREDICTORS",
    "SERVE_PRECISIONS",
    "EnginePredictor",
    "device_predictor",
    "OrtPredictor",
    "Predictor",
    "device_engine",
    "is_device_array",
    "make_predictor",
    "resolve_ort_device",
    "tensorrt_installed",
]

"""TensorRT serving of the adapted model: the ``infer`` graph built once, theta an input.

Decision: theta is a network input (no rebuild, no refit)
---------------------------------------------------------
``infer.onnx`` normalises every BN layer with the statistics of the current image as an
ONNX ``InstanceNormalization`` whose scale and bias are ``Slice``s of the graph input
``theta``: tensors, not initializers. TensorRT's ONNX parser has two importers for it:

* the plugin importer (``InstanceNormalization_TRT``), used when the parser flag
  ``NATIVE_INSTANCENORM`` is off, rejects a scale or bias that is not an initializer
  ("The scale tensor is required to be an initializer"): there, a changing gamma/beta
  could only be fed by refitting named weights;
* the native importer (TensorRT >= 8.6 with ``OnnxParserFlag.NATIVE_INSTANCENORM``, ON by
  default since TensorRT 10.0) builds an ``INormalizationLayer`` from scale and bias
  *tensors* (``INetworkDefinition::addNormalization(input, scale, bias, axesMask)``), so
  a network input is accepted.

So this predictor requires TensorRT 10, sets ``NATIVE_INSTANCENORM`` explicitly (a build
that fell back to the plugin would fail to parse rather than misbehave), and binds theta
as a static ``[n]`` float32 input: an adapted theta serves the next image by copying n
floats to the device, with no rebuild and no refit. The Refitter fallback is therefore
not needed and not implemented.

Precision
---------
``fp32`` is float32 everywhere: ``BuilderFlag.TF32``, on by default in TensorRT, is
cleared. ``tf32`` sets it (convolutions in TensorFloat-32), only when asked by name.
``fp16`` sets ``BuilderFlag.FP16`` and pins to fp32 (``ILayer.precision`` and the output
types, with ``BuilderFlag.PREFER_PRECISION_CONSTRAINTS``) every layer that reads the
adapted inputs (theta, and the statistics of the mixed graphs): the slices, reshapes and
arithmetic that turn theta into scales and shifts, and the layers where those meet the
activations (the normalisation layers, or the element-wise scale and shift the ONNX
importer makes of a BatchNormalization fed by theta). In float16 a gamma of about 1 has a
spacing of about 1e-3 and Adam steps of 1e-5 would be rounded away; the normalisation's
per-image mean and variance are also sums over up to 256x256 positions. ``int8`` adds
``BuilderFlag.INT8`` with an entropy calibrator (``IInt8EntropyCalibrator2``) over
caller-given images at the source theta (the same pinning); TensorRT 10 deprecates this
implicit quantisation.

The default precision is a documented choice per TensorRT build (`default_precision`):
``fp16`` where the builder has ``BuilderFlag.FP16`` (TensorRT 10), ``fp32`` on a strongly
typed TensorRT without it (TensorRT 11, PyPI's newest), where a network computes in the
types of its ONNX graph. The precision built is the predictor's ``precision`` and goes
into every record; asking for fp16 or int8 on such a build is refused in one line, never
served in fp32 instead.

Engine cache
------------
``$GRATA_CACHE/trt/<key>.engine`` with the sidecar ``<key>.json``. The key hashes the
graph's and the weights' SHA-256 (from the verified manifest), the TensorRT version, the
GPU (name and compute capability), the precision and, for int8, the calibration images.
The sidecar records those fields and the engine's SHA-256; an engine is used only when
every field and its digest match and TensorRT deserialises it, otherwise it is rebuilt
and replaced (engine first, sidecar last, each written to a temp file and renamed).

Device buffers come from cuda-python (``cuda.bindings.runtime`` or ``cuda.cudart``) or,
failing that, a CUDA build of torch. Given a `stream` (the adapting engine's), the
predictor runs on it and takes device arrays (``__cuda_array_interface__``) for the image
and theta by address: nothing is copied, and the engine's update is ordered before it.

TensorRT Python API used (10.x), and where:
  trt.__version__, trt.Logger(trt.Logger.WARNING)                     import_tensorrt, build
  trt.Builder(logger); builder.create_network(0)  (explicit batch)    build_engine
  trt.OnnxParser(network, logger); parser.set_flag(
      trt.OnnxParserFlag.NATIVE_INSTANCENORM); parser.parse_from_file(path) -> bool;
      parser.num_errors; parser.get_error(i).desc()                   build_engine
  network.num_inputs; network.get_input(i).name; network.num_layers; network.get_layer(i);
      layer.type (trt.LayerType.CONSTANT); layer.num_inputs; layer.get_input(j) -> ITensor
      | None; layer.num_outputs; layer.get_output(j); tensor.name; tensor.dtype;
      layer.precision = trt.float32; layer.set_output_type(j, trt.float32)   pin_adapted
  builder.create_builder_config(); config.set_memory_pool_limit(
      trt.MemoryPoolType.WORKSPACE, n); config.set_flag(trt.BuilderFlag.FP16 | INT8 | TF32 |
      PREFER_PRECISION_CONSTRAINTS); config.clear_flag(trt.BuilderFlag.TF32);
      config.int8_calibrator = calibrator                                build_engine
  trt.IInt8EntropyCalibrator2: get_batch_size(), get_batch(names) -> [int] | None,
      read_calibration_cache() -> None, write_calibration_cache(cache)    _calibrator
  builder.build_serialized_network(network, config) -> IHostMemory | None   build_engine
  trt.Runtime(logger).deserialize_cuda_engine(blob) -> ICudaEngine | None  TensorRTPredictor
  engine.num_io_tensors; engine.get_tensor_name(i); engine.get_tensor_mode(name)
      (trt.TensorIOMode.INPUT/OUTPUT); engine.get_tensor_shape(name);
      engine.get_tensor_dtype(name) == trt.float32                     TensorRTPredictor
  engine.create_execution_context(); context.set_tensor_address(name, ptr) -> bool;
      context.execute_async_v3(stream_handle) -> bool                  TensorRTPredictor
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from grata.atomic import write_atomic
from grata.defaults import cache_dir
from grata.digest import bytes_sha256 as _sha256
from grata.errors import GrataError
from grata.export.manifest import load_manifest

CACHE_FORMAT = 2  # 2: TF32 cleared at fp32, adapted-input layers pinned at fp16/int8
WORKSPACE_BYTES = 1 << 30
MIN_MAJOR = 10
PRECISIONS = ("fp32", "tf32", "fp16", "int8")
# network inputs that adaptation changes between images: every layer reading them stays
# float32 in a reduced-precision engine
ADAPTED_INPUTS = ("theta", "stats", "alpha")


def import_tensorrt() -> Any:
    """The ``tensorrt`` module (10 or newer), or a one-line GrataError naming the gap."""
    try:
        import tensorrt as trt
    except ImportError:
        raise GrataError("predictor 'tensorrt' needs the TensorRT Python package (TensorRT "
                         f"{MIN_MAJOR}), which is not installed: pip install tensorrt, "
                         "or use --predictor onnxruntime") from None
    except OSError as exc:  # the wheel is there but libnvinfer cannot load
        raise GrataError(f"predictor 'tensorrt': the TensorRT libraries do not load "
                         f"({' '.join(str(exc).split())[:160]})") from None
    try:
        major = int(str(trt.__version__).split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_MAJOR:
        raise GrataError(f"predictor 'tensorrt' needs TensorRT {MIN_MAJOR} or newer "
                         f"(found {trt.__version__})")
    return trt


def has_reduced_precision(trt: Any) -> bool:
    """Whether this TensorRT builds FP16 engines from float32 graphs (TensorRT 10); a
    strongly typed build (TensorRT 11) has no ``BuilderFlag.FP16``."""
    return hasattr(trt.BuilderFlag, "FP16")


def default_precision(trt: Any) -> str:
    """The precision built when none is asked for: fp16 where the builder has the FP16
    flag, fp32 on a strongly typed TensorRT (see the module docstring)."""
    return "fp16" if has_reduced_precision(trt) else "fp32"


def check_precision(trt: Any, precision: str) -> None:
    """A one-line GrataError when this TensorRT cannot build `precision`."""
    if precision not in PRECISIONS:
        raise GrataError(f"unknown precision {precision!r}; choose from "
                         f"{', '.join(PRECISIONS)}")
    flags = {"fp16": ("FP16", "PREFER_PRECISION_CONSTRAINTS"),
             "int8": ("FP16", "INT8", "PREFER_PRECISION_CONSTRAINTS"),
             "tf32": ("TF32",)}.get(precision, ())
    missing = [f for f in flags if not hasattr(trt.BuilderFlag, f)]
    if missing:
        raise GrataError(f"TensorRT {trt.__version__} has no BuilderFlag.{missing[0]} "
                         f"(strongly typed): it does not build {precision} from these "
                         f"float32 graphs; its default here is fp32 (--precision fp32)")


# ----------------------------------------------------------------------- engine cache

def engine_fields(manifest: dict, graph: str, tensorrt_version: str, gpu: str,
                  capability: str, precision: str, calibration: str | None = None) -> dict:
    """Everything an engine depends on; a change in any field means another engine."""
    if precision not in PRECISIONS:
        raise GrataError(f"unknown precision {precision!r}; choose from "
                         f"{', '.join(PRECISIONS)}")
    graph_file = manifest["graphs"][graph]
    weights = manifest.get("weights")
    return {"format": CACHE_FORMAT, "graph": graph,
            "graph_sha256": manifest["sha256"][graph_file],
            "weights_sha256": manifest["sha256"].get(weights) if weights else None,
            "tensorrt": str(tensorrt_version), "gpu": str(gpu),
            "compute_capability": str(capability), "precision": precision,
            "calibration_sha256": calibration if precision == "int8" else None}


class EngineCache:
    """Serialized engines on disk, trusted only when their sidecar matches exactly."""

    def __init__(self, root):
        self.root = Path(root)

    @staticmethod
    def key(fields: dict) -> str:
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return _sha256(text.encode("utf-8"))[:32]

    def paths(self, fields: dict) -> tuple[Path, Path]:
        k = self.key(fields)
        return self.root / f"{k}.engine", self.root / f"{k}.json"

    def load(self, fields: dict) -> bytes | None:
        """The cached engine for `fields`, or None when absent, stale or corrupt."""
        engine, sidecar = self.paths(fields)
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            blob = engine.read_bytes()
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("fields") != fields:
            return None
        if meta.get("engine_sha256") != _sha256(blob):
            return None
        return blob

    def store(self, fields: dict, blob: bytes) -> Path:
        engine, sidecar = self.paths(fields)
        sidecar.unlink(missing_ok=True)  # never a sidecar beside a half-replaced engine
        write_atomic(engine, blob)
        meta = {"fields": fields, "engine_sha256": _sha256(blob), "bytes": len(blob)}
        write_atomic(sidecar, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
        return engine


def default_cache_dir() -> Path:
    return cache_dir() / "trt"


# --------------------------------------------------------------------- device buffers

class _Buffer:
    """A device allocation: its address, shape and dtype (and the owner keeping it)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype, owner: Any = None):
        self.ptr, self.shape, self.dtype, self.owner = int(ptr), shape, np.dtype(dtype), owner

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def cuda_array(a, shape: tuple[int, ...], name: str) -> int | None:
    """The device address of `a` when it is a float32 C-contiguous device array of
    `shape` (``__cuda_array_interface__``), None for a host array; GrataError otherwise."""
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:
        return None
    if tuple(cai["shape"]) != tuple(shape) or cai["typestr"] not in ("<f4", "=f4", "|f4"):
        raise GrataError(f"predict takes {name} as float32 {'x'.join(map(str, shape))}, "
                         f"not {cai['typestr']} {tuple(cai['shape'])}")
    strides = cai.get("strides")
    if strides is not None and tuple(strides) != tuple(
            int(np.prod(shape[k + 1:])) * 4 for k in range(len(shape))):
        raise GrataError(f"predict takes a contiguous {name}")
    return int(cai["data"][0])


class _CudartDevice:
    """Buffers and one stream through cuda-python's runtime bindings."""

    def __init__(self, rt: Any):
        self.rt = rt
        dev = self._ok(rt.cudaGetDevice(), "cudaGetDevice")
        props = self._ok(rt.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
        name = props.name
        self.name = (name.decode("utf-8", "replace") if isinstance(name, bytes)
                     else str(name)).split("\x00")[0].strip()
        self.capability = f"{props.major}.{props.minor}"
        self._stream = self._ok(rt.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle = int(self._stream)
        self._owned: list[int] = []

    def _ok(self, result: tuple, what: str) -> Any:
        err, *rest = result
        if err != self.rt.cudaError_t.cudaSuccess:
            raise GrataError(f"predictor 'tensorrt': {what} failed ({err}); is a CUDA GPU "
                             f"visible?")
        return rest[0] if len(rest) == 1 else None

    def _on(self, stream: int | None):
        if stream is None or int(stream) == self.stream_handle:
            return self._stream
        return self.rt.cudaStream_t(int(stream))

    def alloc(self, shape: tuple[int, ...], dtype=np.float32) -> _Buffer:
        buf = _Buffer(0, tuple(shape), dtype)
        buf.ptr = int(self._ok(self.rt.cudaMalloc(buf.nbytes), "cudaMalloc"))
        self._owned.append(buf.ptr)
        return buf

    def upload(self, buf: _Buffer, host: np.ndarray, stream: int | None = None) -> None:
        host = np.ascontiguousarray(host, dtype=buf.dtype)
        self._ok(self.rt.cudaMemcpyAsync(buf.ptr, host.ctypes.data, buf.nbytes,
                                         self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                         self._on(stream)), "cudaMemcpyAsync")
        # pageable host memory: the copy has read `host` when the call returns

    def download(self, buf: _Buffer, stream: int | None = None) -> np.ndarray:
        host = np.empty(buf.shape, buf.dtype)
        self._ok(self.rt.cudaMemcpyAsync(host.ctypes.data, buf.ptr, buf.nbytes,
                                         self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                         self._on(stream)), "cudaMemcpyAsync")
        self.synchronize(stream)
        return host

    def synchronize(self, stream: int | None = None) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self._on(stream)), "cudaStreamSynchronize")

    def close(self) -> None:
        for ptr in self._owned:
            self.rt.cudaFree(ptr)
        self._owned.clear()


class _TorchDevice:
    """Buffers and one stream through a CUDA build of torch."""

    def __init__(self, torch: Any):
        if not torch.cuda.is_available():
            raise GrataError("predictor 'tensorrt' needs a CUDA GPU; torch sees none")
        self.torch = torch
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.name = torch.cuda.get_device_name(self.device)
        major, minor = torch.cuda.get_device_capability(self.device)
        self.capability = f"{major}.{minor}"
        self._stream = torch.cuda.Stream(device=self.device)
        self.stream_handle = int(self._stream.cuda_stream)

    def _on(self, stream: int | None):
        if stream is None or int(stream) == self.stream_handle:
            return self._stream
        return self.torch.cuda.ExternalStream(int(stream), device=self.device)

    def alloc(self, shape: tuple[int, ...], dtype=np.float32) -> _Buffer:
        if np.dtype(dtype) != np.float32:
            raise GrataError("only float32 device buffers are used")
        t = self.torch.empty(tuple(shape), dtype=self.torch.float32, device=self.device)
        return _Buffer(t.data_ptr(), tuple(shape), dtype, owner=t)

    def upload(self, buf: _Buffer, host: np.ndarray, stream: int | None = None) -> None:
        src = self.torch.from_numpy(np.ascontiguousarray(host, dtype=buf.dtype))
        with self.torch.cuda.stream(self._on(stream)):
            buf.owner.copy_(src.reshape(buf.shape))

    def download(self, buf: _Buffer, stream: int | None = None) -> np.ndarray:
        with self.torch.cuda.stream(self._on(stream)):
            host = buf.owner.cpu()  # waits for the work queued on the stream
        return host.numpy()

    def synchronize(self, stream: int | None = None) -> None:
        self._on(stream).synchronize()

    def close(self) -> None:
        pass


def open_device() -> _CudartDevice | _TorchDevice:
    """cuda-python if installed, else torch with CUDA; a one-line error otherwise."""
    rt = None
    try:
        from cuda.bindings import runtime as rt  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as rt  # older cuda-python
        except ImportError:
            rt = None
    if rt is not None:
        return _CudartDevice(rt)
    try:
        import torch
    except ImportError:
        raise GrataError("predictor 'tensorrt' needs device buffers from cuda-python (pip "
                         "install cuda-python) or a CUDA build of torch; neither is "
                         "installed") from None
    return _TorchDevice(torch)


# ------------------------------------------------------------------------ the builder

def _calibrator(trt: Any, device, images: Sequence[np.ndarray], theta0: np.ndarray,
                size: int):
    """An entropy calibrator feeding `images` one by one, theta fixed at the source."""
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise GrataError(f"TensorRT {trt.__version__} has no INT8 calibrator (implicit "
                         f"quantisation was removed in TensorRT 11); use --precision fp32")

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.index = 0
            self.image = device.alloc((1, 3, size, size))
            self.theta = device.alloc((theta0.size,))
            device.upload(self.theta, theta0)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index >= len(images):
                return None
            device.upload(self.image, np.asarray(images[self.index])[None])
            device.synchronize()
            self.index += 1
            ptrs = {"image": self.image.ptr, "theta": self.theta.ptr}
            return [ptrs[n] for n in names]

        def read_calibration_cache(self) -> None:
            return None  # the engine cache keys on the calibration images instead

        def write_calibration_cache(self, cache) -> None:
            return None

    return Calibrator()


def _is_float(trt: Any, tensor) -> bool:
    return tensor.dtype in (trt.float32, trt.float16)


def adapted_layers(trt: Any, network) -> tuple[list, list]:
    """(path, meet): the layers of `network` that read an adapted input (`ADAPTED_INPUTS`).

    `path` computes from adapted inputs and constants only (theta's slices, reshapes,
    the arithmetic of a scale and shift); `meet` is where such a tensor meets an
    activation (a normalisation, an element-wise scale or shift). Constants are the
    constant layers and what is computed from them alone; integer tensors (shapes,
    indices) are never activations but make nothing constant. Layers come in the
    network's (topological) order."""
    adapted = {network.get_input(i).name for i in range(network.num_inputs)
               if network.get_input(i).name in ADAPTED_INPUTS}
    const: set[str] = set()
    path, meet = [], []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        ins = [layer.get_input(j) for j in range(layer.num_inputs)]
        ins = [t for t in ins if t is not None]
        outs = [layer.get_output(j).name for j in range(layer.num_outputs)]
        reads = [t for t in ins if t.name in adapted]
        activations = [t for t in ins if t.name not in adapted and t.name not in const
                       and _is_float(trt, t)]
        if not reads:
            if all(t.name in const for t in ins):
                const.update(outs)  # constants and what is computed from them alone
            continue
        if activations:
            meet.append(layer)
        else:
            path.append(layer)
            adapted.update(outs)
    return path, meet


def pin_adapted(trt: Any, network) -> list:
    """Run every layer that reads an adapted input in float32 (its precision and its
    float outputs); returns the pinned layers. Normalisation layers are pinned too."""
    path, meet = adapted_layers(trt, network)
    pinned = path + meet
    seen = {id(layer) for layer in pinned}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION and id(layer) not in seen:
            pinned.append(layer)
    for layer in pinned:
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if _is_float(trt, layer.get_output(j)):
                layer.set_output_type(j, trt.float32)
    return pinned


def configure_precision(trt: Any, config, network, precision: str, calibrator=None) -> None:
    """The builder flags of `precision` (see the module docstring)."""
    check_precision(trt, precision)
    if hasattr(trt.BuilderFlag, "TF32"):
        if precision == "tf32":
            config.set_flag(trt.BuilderFlag.TF32)
        else:  # on by default in TensorRT: "fp32" means no TensorFloat-32 anywhere
            config.clear_flag(trt.BuilderFlag.TF32)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        pin_adapted(trt, network)
        if precision == "int8":
            if calibrator is None:
                raise GrataError("--precision int8 needs calibration images")
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = calibrator


def build_engine(trt: Any, onnx_path: Path, precision: str, *, calibrator=None) -> bytes:
    """Parse `onnx_path` (its external weights beside it) and build a serialized engine."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if hasattr(trt.OnnxParserFlag, "NATIVE_INSTANCENORM"):
        parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)  # tensor gamma/beta
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise GrataError(f"TensorRT cannot parse {onnx_path.name}: "
                         f"{' '.join(errors.split())[:300] or 'no detail'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    configure_precision(trt, config, network, precision, calibrator)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise GrataError(f"TensorRT could not build an engine from {onnx_path.name} "
                         f"({precision}); see its log above")
    return bytes(serialized)


# ---------------------------------------------------------------------- the predictor

def calibration_digest(images: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in images:
        a = np.ascontiguousarray(a, dtype=np.float32)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def stream_handle(stream) -> int | None:
    """The raw CUDA stream handle of a CuPy / torch / cuda.core stream or an int."""
    if stream is None:
        return None
    for attr in ("ptr", "cuda_stream", "handle"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    return int(stream)


class TensorRTPredictor:
    """``predict(image, theta) -> logits`` on a TensorRT engine of the ``infer`` graph.

    The engine comes from the cache or is built (and cached) once; ``built`` says which.
    ``predict`` takes host arrays (copied to the device) or device arrays (bound by
    address, no copy), runs ``execute_async_v3`` on the predictor's stream (`stream`: the
    adapting engine's, so its update is ordered before; else one of its own) and copies
    the logits back. `precision` None is `default_precision` of this TensorRT.
    """

    name = "tensorrt"

    def __init__(self, artifacts, *, precision: str | None = None, graph: str = "infer",
                 cache_dir=None, calibration: Sequence[np.ndarray] | None = None,
                 verify: bool = True, stream=None):
        if precision is not None and precision not in PRECISIONS:
            raise GrataError(f"unknown precision {precision!r}; choose from "
                             f"{', '.join(PRECISIONS)}")
        trt = import_tensorrt()
        asked = precision
        precision = precision or default_precision(trt)
        check_precision(trt, precision)
        folder = Path(artifacts)
        manifest = load_manifest(folder, verify=verify)
        if graph not in manifest["graphs"]:
            raise GrataError(f"artifact {folder} has no {graph!r} graph; export again")
        self.size, self.n_theta = int(manifest["size"]), int(manifest["n_theta"])
        self.precision = precision
        self.device = open_device()
        self.stream_handle = stream_handle(stream) or self.device.stream_handle
        calib = list(calibration or []) if precision == "int8" else []
        if precision == "int8" and not calib:
            raise GrataError("--precision int8 needs calibration images (--calibration DIR)")
        fields = engine_fields(manifest, graph, trt.__version__, self.device.name,
                               self.device.capability, precision,
                               calibration_digest(calib) if calib else None)
        self.cache = EngineCache(cache_dir or default_cache_dir())
        self.engine_path = self.cache.paths(fields)[0]
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        blob = self.cache.load(fields)
        engine = runtime.deserialize_cuda_engine(blob) if blob is not None else None
        self.built = engine is None
        if engine is None:  # absent, stale, corrupt or refused by this TensorRT
            calibrator = None
            if precision == "int8":
                theta0 = np.load(folder / manifest["theta0"]).astype(np.float32)
                calibrator = _calibrator(trt, self.device, calib, theta0, self.size)
            blob = build_engine(trt, folder / manifest["graphs"][graph], precision,
                                calibrator=calibrator)
            self.cache.store(fields, blob)
            engine = runtime.deserialize_cuda_engine(blob)
            if engine is None:
                raise GrataError("TensorRT cannot deserialize the engine it just built")
        self._runtime, self._engine = runtime, engine
        self._context = engine.create_execution_context()
        self.shapes = {"image": (1, 3, self.size, self.size), "theta": (self.n_theta,),
                       "logits": (1, 2, self.size, self.size)}
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        if names != set(self.shapes):
            raise GrataError(f"TensorRT engine has I/O {sorted(names)}; expected "
                             f"{sorted(self.shapes)}")
        self._buffers = {}
        self._bound: dict[str, int] = {}
        for name, shape in self.shapes.items():
            mode = trt.TensorIOMode.OUTPUT if name == "logits" else trt.TensorIOMode.INPUT
            if (engine.get_tensor_mode(name) != mode
                    or tuple(engine.get_tensor_shape(name)) != shape
                    or engine.get_tensor_dtype(name) != trt.float32):
                raise GrataError(f"TensorRT engine tensor {name!r} is not a float32 "
                                 f"{'x'.join(map(str, shape))} {mode}")
            self._buffers[name] = self.device.alloc(shape)
            self._bind(name, self._buffers[name].ptr)
        note = "" if asked else " (this TensorRT's default)"
        self.detail = f"TensorRT {trt.__version__} {precision}{note} on {self.device.name}"

    def _bind(self, name: str, ptr: int) -> None:
        if self._bound.get(name) != ptr:
            if not self._context.set_tensor_address(name, ptr):
                raise GrataError(f"TensorRT refused the address of tensor {name!r}")
            self._bound[name] = ptr

    def _input(self, name: str, a) -> None:
        """Bind input `name`: a device array by its address, a host one through a copy."""
        ptr = cuda_array(a, self.shapes[name], name)
        if ptr is None:
            host = np.ascontiguousarray(a, dtype=np.float32)
            if host.shape != self.shapes[name]:
                raise GrataError(f"predict takes image 1x3x{self.size}x{self.size} and "
                                 f"theta [{self.n_theta}], not {name} {host.shape}")
            buf = self._buffers[name]
            self.device.upload(buf, host, self.stream_handle)
            ptr = buf.ptr
        self._bind(name, ptr)

    def predict(self, image, theta) -> np.ndarray:
        self._input("image", image)
        self._input("theta", theta)
        if not self._context.execute_async_v3(self.stream_handle):
            raise GrataError("TensorRT execute_async_v3 failed; see its log")
        return self.device.download(self._buffers["logits"], self.stream_handle)

    def close(self) -> None:
        self._context = None
        self._engine = None
        self.device.close()


__all__ = ["ADAPTED_INPUTS", "PRECISIONS", "EngineCache", "TensorRTPredictor",
           "adapted_layers", "build_engine", "calibration_digest", "check_precision",
           "configure_precision", "cuda_array", "default_cache_dir", "default_precision",
           "engine_fields", "has_reduced_precision", "import_tensorrt", "open_device",
           "pin_adapted", "stream_handle"]

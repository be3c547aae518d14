"""Recording fakes of the GPU APIs the runtime calls (TensorRT's builder, a device array,
a CUDA stream), so the GPU path's decisions are tested on a machine without a GPU.

They record what was asked of them and compute nothing a test asserts numbers from,
except `DeviceArray`, which keeps its values in a host buffer the runtime cannot reach
(converting it to numpy raises, as CuPy does) so a test sees where theta went."""

from __future__ import annotations

import types

import numpy as np
from grata.runtime.tensorrt import _Buffer

# ---------------------------------------------------------------- device arrays


class DeviceArray:
    """A float32 array "on the device": exposes ``__cuda_array_interface__``; implicit
    conversion to numpy raises (CuPy's rule), reading it needs the engine's `to_numpy`."""

    def __init__(self, values, stream: int = 0):
        self._a = np.array(values, dtype=np.float32, copy=True)
        self.stream = stream

    @property
    def __cuda_array_interface__(self):
        return {"shape": self._a.shape, "typestr": "<f4", "data": (self._a.ctypes.data, False),
                "strides": None, "version": 3, "stream": self.stream or None}

    def __array__(self, *args, **kwargs):
        raise TypeError("implicit conversion of a device array to numpy")

    # what methods and engines do with theta-like vectors
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)

    def copy(self):
        return DeviceArray(self._a, self.stream)

    def __float__(self):  # a device scalar read by the host (CuPy syncs here)
        return float(self._a.reshape(-1)[0])

    def __setitem__(self, key, value):
        self._a[key] = value._a if isinstance(value, DeviceArray) else value

    def __getitem__(self, key):
        return DeviceArray(self._a[key], self.stream)

    def __isub__(self, other):
        self._a -= other._a if isinstance(other, DeviceArray) else other
        return self

    def __iadd__(self, other):
        self._a += other._a if isinstance(other, DeviceArray) else other
        return self

    def __imul__(self, other):
        self._a *= other._a if isinstance(other, DeviceArray) else other
        return self

    def _bin(self, other, op):
        return DeviceArray(op(self._a, other._a if isinstance(other, DeviceArray) else other),
                           self.stream)

    def __sub__(self, other):
        return self._bin(other, np.subtract)

    def __add__(self, other):
        return self._bin(other, np.add)

    def __mul__(self, other):
        return self._bin(other, np.multiply)

    __rmul__ = __mul__


def host(a) -> np.ndarray:
    """The values of a DeviceArray (for the fakes themselves and for assertions)."""
    return a._a if isinstance(a, DeviceArray) else np.asarray(a)


class Stream:
    """A CUDA stream: a handle (``ptr``) and what was synchronised on it."""

    def __init__(self, ptr: int):
        self.ptr = int(ptr)
        self.syncs = 0

    def synchronize(self):
        self.syncs += 1

    sync = synchronize  # cuda.core's name


# ---------------------------------------------------------------- TensorRT


class _Flags:
    """An enum-like namespace of the given names (values are the names)."""

    def __init__(self, *names):
        for n in names:
            setattr(self, n, n)


class Tensor:
    def __init__(self, name: str, dtype: str = "float32"):
        self.name, self.dtype = name, dtype


class Layer:
    """An ILayer: its type, inputs and outputs; records precision and output types."""

    def __init__(self, name: str, type_: str, inputs: list, outputs: list):
        self.name, self.type = name, type_
        self._inputs, self._outputs = inputs, outputs
        self.precision_set = None
        self.output_types: dict[int, str] = {}

    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))

    def get_input(self, i):
        return self._inputs[i]

    def get_output(self, i):
        return self._outputs[i]

    @property
    def precision(self):
        return self.precision_set

    @precision.setter
    def precision(self, value):
        self.precision_set = value

    def set_output_type(self, i, dtype):
        if self._outputs[i].dtype not in ("float32", "float16"):
            raise AssertionError(f"{self.name}: output {i} is {self._outputs[i].dtype}")
        self.output_types[i] = dtype


class Network:
    def __init__(self, inputs: list, layers: list):
        self._inputs, self._layers = inputs, layers

    num_inputs = property(lambda self: len(self._inputs))
    num_layers = property(lambda self: len(self._layers))

    def get_input(self, i):
        return self._inputs[i]

    def get_layer(self, i):
        return self._layers[i]


def theta_network() -> tuple[Network, dict]:
    """A small network as TensorRT's ONNX importer makes it of the exported graphs:
    image -> conv -> normalisation with theta's slices (infer), and an element-wise
    scale and shift made of theta (BatchNormalization with tensor inputs, infer_source),
    with a shape computed from an activation on the way. Returns (network, layers by
    name)."""
    image, theta = Tensor("image"), Tensor("theta")
    t = {n: Tensor(n) for n in ("conv1", "g1", "b1", "norm1", "relu1", "conv2", "g2",
                                "b2", "eps", "var", "inv", "scale", "shift0", "shift",
                                "scaled", "bn2", "relu2", "logits")}
    shape = Tensor("shape", "int64")
    L = [
        Layer("conv1", "CONVOLUTION", [image], [t["conv1"]]),
        Layer("slice_g1", "SLICE", [theta], [t["g1"]]),
        Layer("slice_b1", "SLICE", [theta], [t["b1"]]),
        Layer("norm1", "NORMALIZATION", [t["conv1"], t["g1"], t["b1"]], [t["norm1"]]),
        Layer("relu1", "ACTIVATION", [t["norm1"]], [t["relu1"]]),
        Layer("conv2", "CONVOLUTION", [t["relu1"]], [t["conv2"]]),
        Layer("shape2", "SHAPE", [t["conv2"]], [shape]),
        Layer("slice_g2", "SLICE", [theta, shape], [t["g2"]]),
        Layer("slice_b2", "SLICE", [theta], [t["b2"]]),
        Layer("eps", "CONSTANT", [], [t["eps"]]),
        Layer("var", "CONSTANT", [], [t["var"]]),
        Layer("var_eps", "ELEMENTWISE", [t["var"], t["eps"]], [t["inv"]]),
        Layer("scale", "ELEMENTWISE", [t["g2"], t["inv"]], [t["scale"]]),
        Layer("shift0", "ELEMENTWISE", [t["scale"], t["var"]], [t["shift0"]]),
        Layer("shift", "ELEMENTWISE", [t["b2"], t["shift0"]], [t["shift"]]),
        Layer("mul", "ELEMENTWISE", [t["conv2"], t["scale"]], [t["scaled"]]),
        Layer("add", "ELEMENTWISE", [t["scaled"], t["shift"]], [t["bn2"]]),
        Layer("relu2", "ACTIVATION", [t["bn2"]], [t["relu2"]]),
        Layer("head", "CONVOLUTION", [t["relu2"]], [t["logits"]]),
    ]
    return Network([image, theta], L), {layer.name: layer for layer in L}


THETA_PATH = {"slice_g1", "slice_b1", "slice_g2", "slice_b2", "scale", "shift0", "shift"}
THETA_MEETS = {"norm1", "mul", "add"}


class BuilderConfig:
    def __init__(self):
        self.flags: set = {"TF32"}  # TensorRT's default: TF32 on
        self.cleared: list = []
        self.int8_calibrator = None

    def set_memory_pool_limit(self, pool, size):
        self.pool = (pool, size)

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.cleared.append(flag)
        self.flags.discard(flag)


class IOTensors:
    """A deserialised engine with the infer graph's I/O."""

    def __init__(self, size: int, n_theta: int):
        self.shapes = {"image": (1, 3, size, size), "theta": (n_theta,),
                       "logits": (1, 2, size, size)}
        self.names = list(self.shapes)

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "OUTPUT" if name == "logits" else "INPUT"

    def get_tensor_shape(self, name):
        return self.shapes[name]

    def get_tensor_dtype(self, name):
        return "float32"

    def create_execution_context(self):
        return Context()


class Context:
    def __init__(self):
        self.addresses: dict[str, int] = {}
        self.address_calls = 0
        self.executed_on: list[int] = []

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)
        self.address_calls += 1
        return True

    def execute_async_v3(self, stream):
        self.executed_on.append(int(stream))
        return True


def tensorrt(version: str = "10.8.0", fp16: bool = True, network: Network | None = None,
             size: int = 64, n_theta: int = 8):
    """A `tensorrt` module of `version` whose builder returns `network`; without `fp16`
    it is strongly typed (no FP16 / INT8 builder flags, as TensorRT 11)."""
    flags = ["TF32", "PREFER_PRECISION_CONSTRAINTS"] + (["FP16", "INT8"] if fp16 else [])
    rec = types.SimpleNamespace(configs=[], parsed=[])
    net = network or theta_network()[0]

    class Logger:
        WARNING = "WARNING"

        def __init__(self, level):
            self.level = level

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return net

        def create_builder_config(self):
            config = BuilderConfig()
            rec.configs.append(config)
            return config

        def build_serialized_network(self, network, config):
            return b"fake engine " + ",".join(sorted(config.flags)).encode()

    class OnnxParser:
        def __init__(self, network, logger):
            self.flags = []

        def set_flag(self, flag):
            self.flags.append(flag)

        def parse_from_file(self, path):
            rec.parsed.append(path)
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return IOTensors(size, n_theta) if blob else None

    return types.SimpleNamespace(
        __version__=version, Logger=Logger, Builder=Builder, OnnxParser=OnnxParser,
        Runtime=Runtime, BuilderFlag=_Flags(*flags),
        OnnxParserFlag=_Flags("NATIVE_INSTANCENORM"), MemoryPoolType=_Flags("WORKSPACE"),
        LayerType=_Flags("NORMALIZATION", "CONSTANT", "CONVOLUTION", "SLICE", "SHAPE",
                         "ELEMENTWISE", "ACTIVATION"),
        TensorIOMode=_Flags("INPUT", "OUTPUT"),
        float32="float32", float16="float16", int64="int64", record=rec)


class Device:
    """Device buffers and a stream of the TensorRT predictor, recording the copies."""

    def __init__(self, stream_handle: int = 111):
        self.name, self.capability, self.stream_handle = "Fake GPU", "9.0", stream_handle
        self.uploads: list[tuple[str, int]] = []
        self.downloads: list[int] = []
        self._next = 0x1000

    def alloc(self, shape, dtype=np.float32):
        self._next += 0x100000
        return _Buffer(self._next, tuple(shape), dtype)

    def upload(self, buf, host_array, stream=None):
        np.ascontiguousarray(host_array, dtype=np.float32)  # what the real one reads
        self.uploads.append((buf.ptr, self.stream_handle if stream is None else int(stream)))

    def download(self, buf, stream=None):
        self.downloads.append(self.stream_handle if stream is None else int(stream))
        return np.zeros(buf.shape, np.float32)

    def synchronize(self, stream=None):
        pass

    def close(self):
        pass

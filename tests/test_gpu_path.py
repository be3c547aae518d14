"""The GPU path's decisions, checked here without a GPU through recording fakes
(`gpu_fakes`): TF32 only where asked, the adapted inputs' layers pinned to float32 in
reduced-precision TensorRT engines, theta taken by device address on the engine's stream,
one stream per CUDA engine checked in every session, the kernel's stream caches, and
`grata serve --device cuda` on the device engine with the fused update."""

import json
import threading
import time
import types
from pathlib import Path

import gpu_fakes
import numpy as np
import onnxruntime
import pytest
import torch
from grata import engine_chooser
from grata.kernels import cuda_update, numpy_update
from grata.runtime import OrtEngine, cuda_engine, ort_session, predictors, tensorrt
from grata.runtime.adaptive import AdaptiveModel
from grata.runtime.ort_engine import check_input
from grata.runtime.predictors import EnginePredictor, OrtPredictor, make_predictor

from grata.errors import GrataError
from grata.models import ResUnet
from grata.torch_engine import TorchEngine


@pytest.fixture(scope="module")
def art(edge64):
    return edge64[1]


# ------------------------------------------------------------------ 1. TF32


@pytest.fixture
def recorded_sessions(monkeypatch):
    """onnxruntime as if it had the CUDA provider: every InferenceSession's providers are
    recorded, then the session runs on the CPU provider."""
    made = []
    real = onnxruntime.InferenceSession

    def session(path, sess_options=None, providers=None, **kw):
        made.append(list(providers))
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    return made


def _cuda_options(providers) -> dict:
    entry = providers[0]
    assert isinstance(entry, tuple) and entry[0] == "CUDAExecutionProvider", providers
    return entry[1]


def test_fp32_on_the_cuda_provider_turns_tf32_off(recorded_sessions, art):
    assert _cuda_options(ort_session.provider_list("cuda"))["use_tf32"] == "0"
    assert _cuda_options(ort_session.provider_list("cuda", "tf32"))["use_tf32"] == "1"
    OrtEngine(art, device="cuda", threads=1)
    OrtPredictor(art, device="cuda", threads=1)
    assert len(recorded_sessions) >= 4  # three eager engine graphs and the predictor's
    for providers in recorded_sessions:
        assert _cuda_options(providers)["use_tf32"] == "0"
    OrtPredictor(art, device="cuda", threads=1, precision="tf32")
    assert _cuda_options(recorded_sessions[-1])["use_tf32"] == "1"
    p = make_predictor("onnxruntime", art, device="cuda", threads=1, precision="tf32")
    assert p.precision == "tf32" and _cuda_options(recorded_sessions[-1])["use_tf32"] == "1"


def test_tf32_is_a_gpu_mode_and_the_cuda_engine_asks_for_fp32():
    with pytest.raises(GrataError, match="tf32' is a GPU math mode"):
        ort_session.provider_list("cpu", "tf32")
    opts = cuda_engine.provider_options(1234, 0)
    assert opts["use_tf32"] == "0" and opts["user_compute_stream"] == "1234"
    assert cuda_engine.provider_options(1234, 0, tf32=True)["use_tf32"] == "1"


class _StaysOnCpu(ResUnet):
    """A model that ignores .to(cuda): the engine's CUDA set-up runs on a CPU machine."""

    def to(self, *args, **kwargs):
        return self


def test_torch_engine_on_cuda_turns_tf32_off():
    b = torch.backends
    before = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    try:
        b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = True  # cuDNN's default is True
        e = TorchEngine(_StaysOnCpu("edge"), device="cuda")
        assert e.device == "cuda" and not e.tf32
        assert not b.cuda.matmul.allow_tf32 and not b.cudnn.allow_tf32
        TorchEngine(_StaysOnCpu("edge"), device="cuda", tf32=True)
        assert b.cuda.matmul.allow_tf32 and b.cudnn.allow_tf32
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = before


# ------------------------------------------------------------------ 2. TensorRT precision


def _build(precision, fp16=True):
    network, layers = gpu_fakes.theta_network()
    trt = gpu_fakes.tensorrt(fp16=fp16, network=network)
    blob = tensorrt.build_engine(trt, Path("infer.onnx"), precision, calibrator=object())
    return trt.record.configs[-1], layers, blob


def test_tensorrt_fp32_clears_tf32_and_tf32_sets_it():
    config, layers, _ = _build("fp32")
    assert "TF32" in config.cleared and "TF32" not in config.flags
    assert "FP16" not in config.flags
    assert not [n for n, layer in layers.items() if layer.precision_set is not None]
    config, _, _ = _build("tf32")
    assert "TF32" in config.flags and not config.cleared


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_pins_every_layer_that_reads_theta(precision):
    config, layers, _ = _build(precision)
    assert {"FP16", "PREFER_PRECISION_CONSTRAINTS"} <= config.flags
    assert "TF32" in config.cleared  # the pinned layers are float32, not TF32
    assert ("INT8" in config.flags) == (precision == "int8")
    pinned = {n for n, layer in layers.items() if layer.precision_set == "float32"}
    assert pinned == gpu_fakes.THETA_PATH | gpu_fakes.THETA_MEETS
    for name in pinned:
        assert layers[name].output_types == {0: "float32"}, name
    # the convolutions and activations stay free to run in float16
    for name in ("conv1", "conv2", "head", "relu1", "relu2", "shape2", "var_eps"):
        assert layers[name].precision_set is None and not layers[name].output_types


def test_strongly_typed_tensorrt_defaults_to_fp32_and_refuses_fp16():
    new, old = gpu_fakes.tensorrt("11.4.0", fp16=False), gpu_fakes.tensorrt("10.8.0")
    assert tensorrt.default_precision(old) == "fp16"
    assert tensorrt.default_precision(new) == "fp32"
    for precision in ("fp16", "int8"):
        with pytest.raises(GrataError) as err:
            tensorrt.check_precision(new, precision)
        assert "\n" not in str(err.value) and "strongly typed" in str(err.value)
        assert "default here is fp32" in str(err.value)
    tensorrt.check_precision(new, "fp32")


@pytest.fixture
def fake_trt(monkeypatch, art):
    """TensorRTPredictor over fake TensorRT and device modules (strongly typed)."""
    manifest = json.loads((art / "manifest.json").read_text())
    trt = gpu_fakes.tensorrt("11.4.0", fp16=False, size=manifest["size"],
                             n_theta=manifest["n_theta"])
    device = gpu_fakes.Device(stream_handle=111)
    monkeypatch.setattr(tensorrt, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt, "open_device", lambda: device)
    return trt, device, manifest


def test_default_precision_is_recorded_never_a_silent_fallback(fake_trt, art, tmp_path,
                                                                monkeypatch):
    trt, _, _ = fake_trt
    p = tensorrt.TensorRTPredictor(art, cache_dir=tmp_path)
    assert p.precision == "fp32" and "default" in p.detail
    assert "TF32" in trt.record.configs[-1].cleared
    with pytest.raises(GrataError, match="strongly typed"):
        tensorrt.TensorRTPredictor(art, precision="fp16", cache_dir=tmp_path)
    monkeypatch.setattr(predictors, "tensorrt_installed", lambda: True)
    with pytest.raises(GrataError, match="strongly typed"):  # asked for: no fall-back
        make_predictor("auto", art, precision="fp16", cache_dir=tmp_path)
    auto = make_predictor("auto", art, cache_dir=tmp_path)  # the default: recorded
    assert auto.name == "tensorrt" and auto.precision == "fp32"


def test_tensorrt_takes_a_device_theta_by_address_on_the_engines_stream(fake_trt, art,
                                                                        tmp_path):
    _, device, m = fake_trt
    engine_stream = gpu_fakes.Stream(777)
    p = tensorrt.TensorRTPredictor(art, cache_dir=tmp_path, stream=engine_stream)
    S, n = m["size"], m["n_theta"]
    theta = gpu_fakes.DeviceArray(np.ones(n))
    image = gpu_fakes.DeviceArray(np.zeros((1, 3, S, S)))
    out = p.predict(image, theta)
    assert out.shape == (1, 2, S, S)
    ctx = p._context
    assert ctx.addresses["theta"] == theta.__cuda_array_interface__["data"][0]
    assert ctx.addresses["image"] == image.__cuda_array_interface__["data"][0]
    assert ctx.executed_on == [777] and device.downloads == [777]
    assert device.uploads == []  # nothing copied: theta stayed where it was
    # a host theta is copied (on the same stream) into the predictor's own buffer
    p.predict(np.zeros((1, 3, S, S), np.float32), np.ones(n, np.float32))
    assert [s for _, s in device.uploads] == [777, 777]
    assert ctx.addresses["theta"] == p._buffers["theta"].ptr
    with pytest.raises(GrataError, match="float32"):
        p.predict(image, gpu_fakes.DeviceArray(np.ones(n + 1)))


# ------------------------------------------------------------------ 3. streams


class _Session:
    def __init__(self, provider="CUDAExecutionProvider", stream="55"):
        self.provider, self.stream = provider, stream

    def get_providers(self):
        return [self.provider, "CPUExecutionProvider"]

    def get_provider_options(self):
        return {self.provider: {"user_compute_stream": self.stream,
                                "has_user_compute_stream": "1"}}


def test_sessions_must_compute_on_the_engines_stream():
    cuda_engine.check_stream("infer", _Session(stream="55"), 55)
    with pytest.raises(GrataError, match="not compute infer on the engine's stream"):
        cuda_engine.check_stream("infer", _Session(stream="0"), 55)
    with pytest.raises(GrataError, match="could not start CUDAExecutionProvider"):
        cuda_engine.check_stream("infer_mix", _Session("CPUExecutionProvider"), 55)


def test_mixed_graphs_get_the_same_stream_check(monkeypatch, art):
    monkeypatch.setattr(cuda_engine, "_cuda_place", lambda device_id, tf32: cuda_engine._Place(
        np, "cpu", 0, ["CPUExecutionProvider"], None))
    e = cuda_engine.CudaEngine(art, threads=1)
    checked = []
    monkeypatch.setattr(cuda_engine, "check_stream",
                        lambda role, session, handle: checked.append((role, handle)))
    e._place = e._place._replace(stream=gpu_fakes.Stream(55))
    monkeypatch.setattr(e, "_enter", lambda: None)
    x = e.to_input(np.zeros((3, e.size, e.size), np.float32))
    e.infer(x, norm="mix:0.3")
    e.entropy_grad(x, norm="mix:0.3")
    assert checked == [("infer_mix", 55), ("entropy_grad_mix", 55)]


class _FakeCupy:
    """The part of CuPy `_cuda_place` uses: a device count, devices, new streams."""

    def __init__(self):
        self.made = []
        outer = self

        class Device:
            def __init__(self, i):
                self.i = i

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class Stream(gpu_fakes.Stream):
            def __init__(self, non_blocking=False):
                super().__init__(1000 + len(outer.made))
                self.non_blocking = non_blocking
                outer.made.append(self)

        self.cuda = types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDeviceCount=lambda: 1), Device=Device,
            Stream=Stream)


def test_each_cuda_engine_owns_its_stream_and_releases_it(monkeypatch):
    fake = _FakeCupy()
    monkeypatch.setattr(cuda_engine, "_import_cupy", lambda: fake)
    monkeypatch.setattr(cuda_engine, "cuda_provider_available", lambda: True)
    a, b = cuda_engine._cuda_place(0, False), cuda_engine._cuda_place(0, False)
    assert a.stream is not b.stream and a.stream.ptr != b.stream.ptr
    for place in (a, b):
        opts = place.providers[0][1]
        assert opts["user_compute_stream"] == str(place.stream.ptr)
        assert opts["use_tf32"] == "0" and not place.stream.non_blocking
    released = []
    monkeypatch.setattr(cuda_update, "release_stream",
                        lambda handle, device_id=None: released.append(handle))
    e = cuda_engine.CudaEngine.__new__(cuda_engine.CudaEngine)
    e._place, e.sessions, e._bindings, e._outputs = a, {"infer": object()}, {}, {}
    e.close()
    assert released == [a.stream.ptr] and a.stream.syncs == 1
    assert e.stream is None and e.sessions is None


class _FakeBuffer:
    def __init__(self, ptr):
        self.handle, self.closed = ptr, False

    def close(self, stream=None):
        self.closed = True


def test_kernel_stream_caches_are_locked_and_freed_with_the_stream(monkeypatch):
    allocated = []

    class Dev:
        def __init__(self, i):
            pass

        def allocate(self, size, stream=None):
            time.sleep(0.05)  # a slow allocation: both threads are inside at once
            allocated.append(_FakeBuffer(0x5000 + 0x100 * len(allocated)))
            return allocated[-1]

        def create_stream(self, obj):
            time.sleep(0.05)
            return gpu_fakes.Stream(obj.__cuda_stream__()[1])

    core = types.SimpleNamespace(Device=Dev)
    memsets = []
    driver = types.SimpleNamespace(
        cuMemsetD8Async=lambda ptr, v, n, h: memsets.append((ptr, h)) or (0,))
    monkeypatch.setattr(cuda_update, "_core", lambda: core)
    monkeypatch.setattr(cuda_update, "_driver", lambda: driver)
    st = cuda_update._DeviceState(0, "sm_90", {}, 132, 264, 264, True, {}, {})
    monkeypatch.setitem(cuda_update._STATES, 0, st)
    got = []

    def use():
        s = cuda_update._core_stream(st, 4242)
        got.append((s, cuda_update._workspace(st, 4242, s)))

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(allocated) == 1 and len({id(s) for s, _ in got}) == 1
    assert {w for _, w in got} == {0x5000} and memsets == [(0x5000, 4242)]
    assert cuda_update.release_stream(4242, 0)
    assert allocated[0].closed and got[0][0].syncs == 1
    assert 4242 not in st.streams and 4242 not in st.workspaces
    # the driver may hand the same handle to a new stream: it gets a fresh, zeroed workspace
    s = cuda_update._core_stream(st, 4242)
    assert s is not got[0][0] and cuda_update._workspace(st, 4242, s) == 0x5100
    assert memsets[-1] == (0x5100, 4242)
    assert not cuda_update.release_stream(9999, 0)


# ------------------------------------------------------------------ 4. serve on cuda


class FakeCudaEngine:
    """`CudaEngine`'s interface over device arrays (`gpu_fakes.DeviceArray`), with the
    graphs' numbers from the CPU engine; records every host read."""

    kind, device = "onnx", "cuda"

    def __init__(self, artifacts, device_id=0, threads=None, verify=True, tf32=False):
        self.cpu = OrtEngine(artifacts, threads=threads, verify=verify)
        self.stream = gpu_fakes.Stream(777)
        self.folder, self.manifest = self.cpu.folder, self.cpu.manifest
        self.size, self.layout, self.dtype = self.cpu.size, self.cpu.layout, np.float32
        self.sessions = self.cpu.sessions
        dev = self._dev
        self.theta0, self.theta = dev(self.cpu.theta0), dev(self.cpu.theta0)
        self.stats0 = None if self.cpu.stats0 is None else dev(self.cpu.stats0)
        self.stats = None if self.stats0 is None else self.stats0.copy()
        self.img_stats = None if self.stats0 is None else dev(np.zeros_like(self.cpu.stats0))
        self.reads, self.graph_thetas, self.stats_reads = [], [], 0

    def _dev(self, a):
        return gpu_fakes.DeviceArray(a, stream=self.stream.ptr)

    def to_input(self, image):
        return self._dev(check_input(image, self.size))

    def to_numpy(self, x):
        if isinstance(x, gpu_fakes.DeviceArray):
            self.reads.append(x.shape)
            self.stats_reads += x is self.stats
            return gpu_fakes.host(x).copy()
        return np.asarray(x)

    def zeros(self):
        return self._dev(np.zeros(self.theta.shape, np.float32))

    def copy(self, a):
        return a.copy()

    def assign(self, dst, src):
        dst[...] = src if isinstance(src, gpu_fakes.DeviceArray) else np.asarray(src)

    def all_finite(self, *arrays):
        return all(np.isfinite(gpu_fakes.host(a)).all() for a in arrays)

    def scalar(self):
        return self._dev(np.zeros(1))

    def norm_state(self):
        return self.to_numpy(self.stats)

    def load_norm_state(self, stats):
        self.stats[...] = np.asarray(stats, np.float32)

    def _sync_in(self):
        self.graph_thetas.append(self.theta)
        self.cpu.theta[...] = gpu_fakes.host(self.theta)
        if self.stats is not None:
            self.cpu.stats[...] = gpu_fakes.host(self.stats)

    def infer(self, x, norm="sample"):
        self._sync_in()
        out = self.cpu.infer(gpu_fakes.host(x), norm=norm)
        if self.img_stats is not None:
            self.img_stats[...] = self.cpu.img_stats
        return self._dev(out)

    def entropy_grad(self, x, norm="sample"):
        self._sync_in()
        loss, g = self.cpu.entropy_grad(gpu_fakes.host(x), norm=norm)
        return self._dev([loss])[0], self._dev(g)

    def consistency_grad(self, x, strong, norm="sample"):
        self._sync_in()
        loss, g = self.cpu.consistency_grad(gpu_fakes.host(x), gpu_fakes.host(strong),
                                            norm=norm)
        return self._dev([loss])[0], self._dev(g)


@pytest.fixture
def fused(monkeypatch):
    """The fused kernel's entry points, recording their device arrays and stream, doing
    the update with the numpy implementation on the arrays' values."""
    calls = []

    def grata(theta, m, v, g_p, g_a, step, beta, betas, eps, *, cos_out=None, **kw):
        calls.append(("grata", theta, kw))
        h = gpu_fakes.host
        out = None if cos_out is None else h(cos_out)
        return numpy_update.grata_update(h(theta), h(m), h(v), h(g_p), h(g_a), step, beta,
                                         betas, eps, cos_out=out)

    def adam(theta, m, v, g, step, lr, betas, eps, **kw):
        calls.append(("adam", theta, kw))
        h = gpu_fakes.host
        numpy_update.adam_update(h(theta), h(m), h(v), h(g), step, lr, betas, eps)

    monkeypatch.setattr(cuda_update, "grata_update", grata)
    monkeypatch.setattr(cuda_update, "adam_update", adam)
    return calls


@pytest.mark.parametrize("norm", ["sample", "ema:0.2"])
def test_serve_on_cuda_adapts_on_the_device_engine(monkeypatch, art, fused, norm):
    monkeypatch.setattr(engine_chooser, "CudaEngine", FakeCudaEngine)  # what serve asks
    images = [np.random.default_rng(i).random((3, 64, 64), dtype=np.float32)
              for i in range(3)]
    ref = AdaptiveModel(art, method="grata", predictor="onnxruntime", device="cpu",
                        threads=1, norm=norm)
    gpu = AdaptiveModel(art, method="grata", predictor="onnxruntime", device="cuda",
                        threads=1, norm=norm)
    e = gpu.engine
    assert isinstance(e, FakeCudaEngine)
    if norm == "sample":
        assert isinstance(gpu.predictor, EnginePredictor)
    theta = e.theta
    for img in images:
        r, q = ref.process(img)["record"], gpu.process(img)["record"]
        # the same numbers as the CPU engine (the fake kernel is the numpy update) ...
        assert q["theta_sha256"] == r["theta_sha256"] and q["vcdr"] == r["vcdr"]
    # ... with theta on the device throughout: the same device array, updated in place
    # by the fused kernel once per image, and every graph (the predictor's too) read it
    assert e.theta is theta and isinstance(theta, gpu_fakes.DeviceArray)
    assert [c[0] for c in fused] == ["grata"] * len(images)
    assert all(c[1] is theta for c in fused)
    assert all(t is theta for t in e.graph_thetas)
    assert np.linalg.norm(gpu.theta - gpu_fakes.host(e.theta0)) > 0  # theta moved
    assert gpu.describe().startswith("method")
    if norm.startswith("ema"):
        # the stream statistics come to the host once per image (the state's snapshot);
        # the ones the image was served at stay on the device
        assert e.stats_reads == len(images)

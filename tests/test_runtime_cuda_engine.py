"""The CUDA engine: one-line errors where it cannot run, its IOBinding path on host buffers,
and (with a GPU and onnxruntime-gpu) the stream against the CPU engine with nothing read
back to the host between passes."""

import types

import numpy as np
import pytest
from grata.runtime import OrtEngine, cuda_engine

from grata.cli import main
from grata.engine_chooser import engine_factory, open_engine
from grata.errors import GrataError
from grata.methods import create
from grata.synth import TARGET_DOMAINS, generate, render

SIZE = 64
REASON = cuda_engine.cuda_unavailable()
gpu = pytest.mark.skipif(REASON is not None,
                         reason=f"no CUDA device / onnxruntime-gpu: {REASON}")


@pytest.fixture(scope="module")
def art(edge64):
    return edge64[1]


@pytest.fixture(scope="module")
def images():
    """Five fundus-like [3,S,S] images in [0, 1]."""
    rng = np.random.default_rng(3)
    out = []
    for i in range(5):
        img = render(rng, TARGET_DOMAINS[i % len(TARGET_DOMAINS)], SIZE)[0]
        img = img.astype(np.float32).transpose(2, 0, 1)
        out.append((img - img.min()) / max(float(img.max() - img.min()), 1e-6))
    return out


def run_stream(method, images):
    preds = []
    for img in images:
        x = method.engine.to_input(img)
        preds.append(method.engine.to_numpy(method.adapt(x, image=img)))
    return preds


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------- no GPU needed


def test_missing_packages_are_named_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_engine, "_import_cupy", lambda: None)
    monkeypatch.setattr(cuda_engine, "cuda_provider_available", lambda: False)
    with pytest.raises(GrataError) as err:
        open_engine(tmp_path / "no-artifacts", device="cuda")
    msg = str(err.value)
    assert "\n" not in msg
    assert "--device cuda with --engine onnx needs onnxruntime-gpu and cupy" in msg
    assert "pip install" in msg and "cupy-cuda12x" in msg
    monkeypatch.setattr(cuda_engine, "cuda_provider_available", lambda: True)
    with pytest.raises(GrataError, match=r"needs cupy: pip install"):
        open_engine(tmp_path / "no-artifacts", device="cuda")


def test_no_cuda_device_is_one_line(monkeypatch, tmp_path):
    def no_driver():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected\n(detail)")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=no_driver)))
    monkeypatch.setattr(cuda_engine, "_import_cupy", lambda: fake)
    monkeypatch.setattr(cuda_engine, "cuda_provider_available", lambda: True)
    with pytest.raises(GrataError) as err:
        cuda_engine.CudaEngine(tmp_path)
    assert str(err.value) == ("--device cuda: no CUDA device (cudaErrorNoDevice: no "
                              "CUDA-capable device is detected)")
    fake.cuda.runtime.getDeviceCount = lambda: 1
    assert cuda_engine.cuda_unavailable(1) == "--device cuda: no CUDA device 1 (1 found)"
    assert cuda_engine.cuda_unavailable(0) is None


def test_cli_routes_cuda_to_the_device_engine(monkeypatch, art, tmp_path, capsys):
    monkeypatch.setattr(cuda_engine, "_import_cupy", lambda: None)
    with pytest.raises(GrataError, match="needs .*cupy"):
        engine_factory("onnx", artifacts=art, device="cuda", threads=1)()
    generate(tmp_path / "data", seed=1, n_source=(1, 0), n_target=(1, 0), size=SIZE,
             progress=False)
    code = main(["adapt", "--data", str(tmp_path / "data"), "--checkpoint",
                 str(tmp_path / "unused.pt"), "--arch", "edge", "--size", str(SIZE),
                 "--artifacts", str(art), "--device", "cuda", "--out", str(tmp_path / "run"),
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cupy" in err, err


@pytest.fixture
def host_engine(monkeypatch, art):
    """The CUDA engine's code on host buffers: numpy arrays bound to the CPU provider."""
    monkeypatch.setattr(cuda_engine, "_cuda_place", lambda device_id, tf32: cuda_engine._Place(
        np, "cpu", 0, ["CPUExecutionProvider"], None))
    return cuda_engine.CudaEngine(art, threads=2)


def test_graphs_write_into_the_bound_buffers(host_engine, art, images):
    e, ref = host_engine, OrtEngine(art, threads=2)
    x, strong = e.to_input(images[0]), e.to_input(images[1])
    loss, g = e.entropy_grad(x)
    loss_r, g_r = ref.entropy_grad(x)
    assert float(loss) == pytest.approx(loss_r, rel=1e-6)
    np.testing.assert_allclose(g, g_r, rtol=1e-5, atol=1e-9)
    loss_p, g_p = e.consistency_grad(x, strong)
    loss_pr, g_pr = ref.consistency_grad(x, strong)
    assert float(loss_p) == pytest.approx(loss_pr, rel=1e-6)
    np.testing.assert_allclose(g_p, g_pr, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(e.infer(x), ref.infer(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e.infer(x, norm="source"), ref.infer(x, norm="source"),
                               rtol=1e-5, atol=1e-6)
    # Preallocated outputs: a second pass writes the same buffer, no new array.
    g_before = g.copy()
    e.theta[:] *= 1.01
    _, g2 = e.entropy_grad(x)
    assert g2 is g and not np.array_equal(g2, g_before)


@pytest.mark.parametrize("name", ["grata", "tent"])
def test_host_buffers_follow_the_cpu_engine(host_engine, art, images, name):
    calls = []
    host_engine.to_numpy = lambda a, f=host_engine.to_numpy: calls.append(1) or f(a)
    method = create(name, host_engine, seed=2)
    ref = create(name, OrtEngine(art, threads=2), seed=2)
    for img in images:
        method.adapt(host_engine.to_input(img), image=img)
        ref.adapt(ref.engine.to_input(img), image=img)
    assert not calls  # adapt itself never reads device memory back
    assert np.linalg.norm(ref.engine.theta - ref.engine.theta0) > 1e-5
    assert rel(host_engine.theta, ref.engine.theta) <= 1e-6
    assert not method.events


@pytest.mark.parametrize("name, norm", [("grata", "mix:0.3"), ("tent", "ema:0.2"),
                                        ("tent", "source")])
def test_host_buffers_follow_the_cpu_engine_with_other_statistics(art, images, name, norm,
                                                                   monkeypatch):
    monkeypatch.setattr(cuda_engine, "_cuda_place", lambda device_id, tf32: cuda_engine._Place(
        np, "cpu", 0, ["CPUExecutionProvider"], None))
    e = cuda_engine.CudaEngine(art, threads=2)
    hp = {"lr": 1e-3} if name == "tent" else {"beta": 1e-3}
    method = create(name, e, seed=2, norm=norm, **hp)
    ref = create(name, OrtEngine(art, threads=2), seed=2, norm=norm, **hp)
    preds, preds_ref = run_stream(method, images), run_stream(ref, images)
    assert np.linalg.norm(ref.engine.theta - ref.engine.theta0) > 1e-4
    assert rel(e.theta, ref.engine.theta) <= 1e-6
    assert rel(e.norm_state(), ref.engine.norm_state()) <= 1e-6
    for p, q in zip(preds, preds_ref):
        np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-4)
    assert not method.events


# ---------------------------------------------------------------- GPU


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["grata", "tent"])
def test_cuda_stream_matches_the_cpu_engine(art, images, name):
    import cupy

    e = cuda_engine.CudaEngine(art)
    cuda, cpu = create(name, e, seed=1), create(name, OrtEngine(art, threads=2), seed=1)
    preds, preds_ref = run_stream(cuda, images), run_stream(cpu, images)
    assert isinstance(e.theta, cupy.ndarray) and isinstance(cuda.m, cupy.ndarray)
    theta, theta_ref = e.to_numpy(e.theta), cpu.engine.theta
    assert np.linalg.norm(theta_ref - cpu.engine.theta0) > 1e-5  # the stream moved theta
    assert rel(theta, theta_ref) <= 1e-4
    for p, q in zip(preds, preds_ref):
        assert np.mean((p > 0) == (q > 0)) >= 0.999
    assert not cuda.events


@gpu
@pytest.mark.gpu
def test_no_host_transfer_between_passes(art, images):
    import cupy

    e = cuda_engine.CudaEngine(art)
    method = create("grata", e, seed=0)
    run_stream(method, images[:1])  # warm-up: kernel, cuDNN plans, memory pools
    calls = []
    e.to_numpy = lambda a, f=e.to_numpy: calls.append(1) or f(a)
    x, img = e.to_input(images[1]), images[1]
    logits = method.adapt(x, image=img)
    assert not calls and isinstance(logits, cupy.ndarray)
    assert all(isinstance(v, (cupy.ndarray, cuda_engine._DeviceScalar))
               for v in method.last.values())
    # One step queued behind ~tens of ms of device work: had anything in it (graph, update,
    # theta arithmetic) waited for the device or copied to the host, the queue would be
    # empty when it returns.
    strong = method.draw_strong(img)
    busy = cupy.ones(1 << 26, dtype=cupy.float32)
    e.stream.synchronize()
    with e.stream:
        for _ in range(200):
            busy *= 1.0
    assert not e.stream.done
    method.step(x, strong)
    assert not e.stream.done, "the step waited for the device"
    assert e.all_finite(e.theta, method.m, method.v, *method.last.values())

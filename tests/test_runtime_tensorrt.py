"""TensorRT serving backend: the engine cache everywhere; engines where TensorRT and a GPU
are present (skipped elsewhere, with the reason)."""

import json

import numpy as np
import pytest
from grata.runtime.predictors import make_predictor, tensorrt_installed
from grata.runtime.tensorrt import EngineCache, engine_fields, import_tensorrt

from grata.errors import GrataError

MANIFEST = {"graphs": {"infer": "infer.onnx"}, "weights": "weights.bin",
            "sha256": {"infer.onnx": "a" * 64, "weights.bin": "b" * 64}}


def fields(**change):
    f = engine_fields(MANIFEST, "infer", "10.3.0", "NVIDIA H100", "9.0", "fp16")
    f.update(change)
    return f


def test_engine_cache_trusts_only_an_exact_match(tmp_path):
    cache = EngineCache(tmp_path)
    blob = b"serialized engine" * 100
    assert cache.load(fields()) is None
    path = cache.store(fields(), blob)
    assert path.parent == tmp_path and path.suffix == ".engine"
    assert cache.load(fields()) == blob
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["fields"] == fields() and sidecar["bytes"] == len(blob)
    # any key differs -> another engine, never this one
    for change in ({"tensorrt": "10.4.0"}, {"gpu": "NVIDIA A100"}, {"precision": "fp32"},
                   {"compute_capability": "8.0"}, {"graph_sha256": "c" * 64},
                   {"weights_sha256": "d" * 64}):
        assert cache.load(fields(**change)) is None, change
    assert len({EngineCache.key(fields(precision=p)) for p in ("fp16", "fp32", "int8")}) == 3
    # a changed byte in the engine, or a sidecar that does not match -> rebuilt
    data = bytearray(path.read_bytes())
    data[5] ^= 1
    path.write_bytes(bytes(data))
    assert cache.load(fields()) is None
    cache.store(fields(), blob)
    sidecar["fields"]["tensorrt"] = "9.0"
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    assert cache.load(fields()) is None
    path.with_suffix(".json").write_text("{not json")
    assert cache.load(fields()) is None
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_engine_fields():
    f = fields()
    assert f["graph_sha256"] == "a" * 64 and f["weights_sha256"] == "b" * 64
    assert f["calibration_sha256"] is None
    int8 = engine_fields(MANIFEST, "infer", "10.3.0", "g", "9.0", "int8", "e" * 64)
    assert int8["calibration_sha256"] == "e" * 64
    with pytest.raises(GrataError, match="unknown precision"):
        engine_fields(MANIFEST, "infer", "10.3.0", "g", "9.0", "fp8")


@pytest.mark.skipif(tensorrt_installed(), reason="tensorrt is installed here")
def test_missing_tensorrt_is_one_line():
    with pytest.raises(GrataError, match="needs the TensorRT Python package") as exc:
        import_tensorrt()
    assert "\n" not in str(exc.value)


# --------------------------------------------------------------- needs TensorRT + GPU

def _gpu_skip_reason() -> str | None:
    if not tensorrt_installed():
        return "the tensorrt package is not installed"
    try:
        from grata.runtime.tensorrt import open_device
        import_tensorrt()
        open_device()
    except GrataError as exc:
        return str(exc)
    return None


SKIP = _gpu_skip_reason()
needs_gpu = pytest.mark.skipif(SKIP is not None, reason=f"TensorRT engine tests: {SKIP}")


@pytest.fixture(scope="module")
def artifacts(request):
    if SKIP is not None:
        pytest.skip(f"TensorRT engine tests: {SKIP}")
    return request.getfixturevalue("edge64")[1]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol", [("fp32", 2e-3), ("fp16", 5e-2)])
def test_tensorrt_matches_onnxruntime_and_takes_a_new_theta(artifacts, tmp_path, precision,
                                                             tol):
    ort = make_predictor("onnxruntime", artifacts, threads=1)
    trt = make_predictor("tensorrt", artifacts, precision=precision, cache_dir=tmp_path)
    assert trt.name == "tensorrt" and trt.built
    rng = np.random.default_rng(0)
    x = rng.random((1, 3, 64, 64), dtype=np.float32)
    theta0 = np.load(artifacts / "theta0.npy")
    for theta in (theta0, theta0 * rng.uniform(0.8, 1.2, theta0.shape).astype(np.float32)):
        ref, out = ort.predict(x, theta), trt.predict(x, theta)  # same engine, new theta
        assert out.shape == ref.shape == (1, 2, 64, 64)
        scale = np.abs(ref).max()
        assert np.abs(out - ref).max() <= tol * scale, precision
        assert ((out > 0) == (ref > 0)).mean() > 0.99
    again = make_predictor("tensorrt", artifacts, precision=precision, cache_dir=tmp_path)
    assert not again.built  # from the cache
    assert np.array_equal(again.predict(x, theta0), trt.predict(x, theta0))
    sidecar = again.engine_path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["engine_sha256"] = "0" * 64
    sidecar.write_text(json.dumps(meta))
    assert make_predictor("tensorrt", artifacts, precision=precision,
                          cache_dir=tmp_path).built  # not trusted: rebuilt

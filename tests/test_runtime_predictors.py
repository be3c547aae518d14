"""Predictors: the onnxruntime one is the infer graph; an unavailable one is one line."""

import numpy as np
import pytest
from serve_helpers import SIZE, make_inbox, serve_args

from grata.cli import main
from grata.errors import GrataError
from grata.runtime import OrtEngine
from grata.runtime.predictors import OrtPredictor, make_predictor, tensorrt_installed


@pytest.fixture(scope="module")
def artifacts(edge64):
    return edge64[1]


@pytest.mark.skipif(tensorrt_installed(), reason="tensorrt is installed here")
def test_unavailable_predictor_is_one_line(artifacts, tmp_path, capsys):
    make_inbox(tmp_path / "inbox", 1)
    args = serve_args(tmp_path / "inbox", tmp_path / "out", artifacts, "--once")
    args[args.index("onnxruntime")] = "tensorrt"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs the TensorRT Python package" in err
    with pytest.raises(GrataError, match="needs the tensorrt predictor"):
        make_predictor("onnxruntime", artifacts, precision="fp16")
    auto = make_predictor("auto", artifacts, threads=1)
    assert auto.name == "onnxruntime" and "not installed" in auto.fallback


def test_ort_predictor_is_the_infer_graph(artifacts):
    engine = OrtEngine(artifacts, threads=1)
    p = OrtPredictor(artifacts, threads=1)
    x = np.random.default_rng(0).random((1, 3, SIZE, SIZE), dtype=np.float32)
    theta = engine.theta0 * np.float32(1.01)
    engine.theta[:] = theta
    assert np.array_equal(p.predict(x, theta), engine.infer(x))
    with pytest.raises(GrataError, match="1x3x64x64"):
        p.predict(x[0], theta)

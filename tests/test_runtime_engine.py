"""The onnx runtime against the torch reference on a whole stream, and its footprint."""

import json
import subprocess
import sys

import numpy as np
import pytest
from grata.runtime import OrtEngine

from grata import metrics
from grata.cli import main
from grata.domains import Sample, stream_domain
from grata.methods import create
from grata.models import load_checkpoint
from grata.synth import SOURCE_DOMAIN, TARGET_DOMAINS, generate

SIZE = 64


@pytest.fixture(scope="module")
def bench(tmp_path_factory, edge64):
    root = tmp_path_factory.mktemp("rt")
    generate(root / "data", seed=11, n_source=(2, 1), n_target=(12, 8), size=96, progress=False)
    for name, src in zip(("edge.pt", "art"), edge64):
        (root / name).symlink_to(src)
    return root


def run_stream(method, samples):
    rows = []
    for s in samples:
        x = method.engine.to_input(s.image)
        logits = method.engine.to_numpy(method.adapt(x, image=s.image))[0]
        pred = metrics.binarize(metrics.probs_from_logits(np.asarray(logits, np.float32)))
        rows.append(metrics.image_metrics(pred, s.target))
    return metrics.aggregate(rows)


@pytest.mark.parametrize("name", ["grata", "tent"])
def test_onnx_stream_ends_where_torch_ends(bench, name):
    samples = [s for s in stream_domain(bench / "data", TARGET_DOMAINS[0], SIZE)
               if isinstance(s, Sample)]
    assert len(samples) == 20
    ref = create(name, load_checkpoint(bench / "edge.pt", "edge"), seed=4)
    ort = create(name, OrtEngine(bench / "art", threads=2), seed=4)
    agg_ref, agg_ort = run_stream(ref, samples), run_stream(ort, samples)
    t_ref = ref.engine.theta.numpy().astype(np.float64)
    t_ort = ort.engine.theta.astype(np.float64)
    t0 = ref.engine.theta0.numpy().astype(np.float64)
    assert np.linalg.norm(t_ref - t0) > 1e-3  # the stream moved theta
    assert np.linalg.norm(t_ort - t_ref) / np.linalg.norm(t_ref) <= 1e-4
    for key in ("dice_od", "dice_oc", "dice_mean"):
        assert abs(agg_ort[key] - agg_ref[key]) <= 0.1, key


def test_source_method_runs_on_onnx_with_running_statistics(bench):
    x = np.random.default_rng(0).random((3, SIZE, SIZE), dtype=np.float32)
    ref = create("source", load_checkpoint(bench / "edge.pt", "edge"))
    ort = create("source", OrtEngine(bench / "art"))
    a = ref.adapt(ref.engine.to_input(x)).numpy()
    b = ort.adapt(ort.engine.to_input(x))
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)


def test_non_finite_image_keeps_the_stream_alive(bench):
    method = create("grata", OrtEngine(bench / "art"))
    theta0 = method.engine.theta.copy()
    bad = np.full((3, SIZE, SIZE), np.nan, np.float32)
    method.adapt(method.engine.to_input(bad), image=bad)
    assert np.array_equal(method.engine.theta, theta0)
    assert method.events and method.events[0]["event"] == "non-finite"
    good = np.random.default_rng(1).random((3, SIZE, SIZE), dtype=np.float32)
    method.adapt(method.engine.to_input(good), image=good)
    assert not np.array_equal(method.engine.theta, theta0) and np.isfinite(method.engine.theta).all()


def test_onnx_backend_run_never_imports_torch(bench, tmp_path):
    code = (
        "import sys\n"
        "from grata.cli import main\n"
        f"rc = main(['adapt', '--data', {str(bench / 'data')!r}, '--source', {SOURCE_DOMAIN!r},"
        f" '--targets', {TARGET_DOMAINS[1]!r}, '--artifacts', {str(bench / 'art')!r},"
        f" '--size', '{SIZE}', '--methods', 'source,bn,tent,grata', '--quiet',"
        f" '--out', {str(tmp_path / 'run')!r}])\n"
        "assert rc == 0, rc\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print('TORCH', leaked)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TORCH []" in out.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["engine"] == "onnx" and len(report["results"]) == 4


def test_tampered_artifacts_are_refused_in_one_line(bench, tmp_path, capsys):
    import shutil
    art = tmp_path / "art"
    shutil.copytree(bench / "art", art)
    blob = bytearray((art / "weights.bin").read_bytes())
    blob[len(blob) // 2] ^= 1
    (art / "weights.bin").write_bytes(bytes(blob))
    rc = main(["adapt", "--data", str(bench / "data"), "--source", SOURCE_DOMAIN,
               "--artifacts", str(art), "--size", str(SIZE), "--quiet",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "weights.bin" in err and len(err.splitlines()) == 1

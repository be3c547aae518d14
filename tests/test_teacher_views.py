"""The consistency graphs' teacher, view by view or in one batch: the same loss and
gradient (BN uses each sample's own statistics, or each sample's mixed with fixed
inputs), and the other graphs untouched."""

import numpy as np
import onnxruntime as ort
import pytest
from grata.export import DEVICE_TEACHER_VIEWS, export_artifacts, load_manifest
from grata.runtime.ort_session import session_options

from grata.cli import main
from grata.errors import GrataError


def _run(folder, role, feeds):
    sess = ort.InferenceSession(str(folder / f"{role}.onnx"), session_options(1),
                                providers=["CPUExecutionProvider"])
    return sess.run(["loss", "grad"], feeds)


@pytest.fixture(scope="module")
def per_view(edge64, tmp_path_factory):
    """{views: artifact folder} of the shared edge checkpoint, teacher 1 and 2 per pass."""
    checkpoint, _ = edge64
    root = tmp_path_factory.mktemp("views")
    return {v: (root / f"views{v}", export_artifacts(checkpoint, "edge", 64, root / f"views{v}",
                                                     teacher_views=v)) for v in (1, 2)}


@pytest.mark.parametrize("views", [1, 2])
def test_teacher_views_give_the_batched_result(edge64, per_view, views):
    _, batched = edge64
    folder, manifest = per_view[views]
    assert manifest["teacher_views"] == views
    assert load_manifest(batched)["teacher_views"] == 6
    for role, f in manifest["graphs"].items():  # only the teacher changes
        same = (folder / f).read_bytes() == (batched / f).read_bytes()
        assert same == (not role.startswith("consistency_grad")), role
    rng = np.random.default_rng(views)
    theta0 = np.load(folder / manifest["theta0"])
    stats0 = np.load(folder / manifest["stats0"])
    for _ in range(2):
        theta = (theta0 * (1 + 0.2 * rng.standard_normal(theta0.size))).astype(np.float32)
        feeds = {"image": rng.random((1, 3, 64, 64), dtype=np.float32),
                 "strong_image": rng.random((1, 3, 64, 64), dtype=np.float32),
                 "theta": theta}
        # per-sample statistics, and mixed with fixed ones (a stream estimate's stand-in)
        stats = (stats0 * (1 + 0.1 * rng.standard_normal(stats0.size))).astype(np.float32)
        mixed = {**feeds, "stats": np.abs(stats), "alpha": np.array([0.3], np.float32)}
        for role, f in (("consistency_grad", feeds), ("consistency_grad_mix", mixed)):
            loss, grad = _run(folder, role, f)
            ref_loss, ref_grad = _run(batched, role, f)
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
            assert np.linalg.norm(grad - ref_grad) <= 1e-5 * np.linalg.norm(ref_grad), role
            assert np.linalg.norm(ref_grad) > 0


@pytest.mark.parametrize("views", [0, 4, 7, True, 1.0])
def test_teacher_views_must_divide_six(edge64, tmp_path, views):
    checkpoint, _ = edge64
    with pytest.raises(GrataError, match="teacher_views"):
        export_artifacts(checkpoint, "edge", 64, tmp_path / "art", teacher_views=views)
    assert not (tmp_path / "art").exists()


def test_grata_export_and_the_cache_write_the_device_layout(edge64, tmp_path, monkeypatch):
    from grata.artifacts import cached_artifacts
    checkpoint, _ = edge64
    out = tmp_path / "art"
    assert main(["export", "--checkpoint", str(checkpoint), "--arch", "edge", "--size", "64",
                 "--out", str(out)]) == 0
    manifest = load_manifest(out)
    assert manifest["teacher_views"] == DEVICE_TEACHER_VIEWS == 1
    assert set(manifest["weights_index"]) and "infer" in manifest["graphs"]
    monkeypatch.setenv("GRATA_CACHE", str(tmp_path / "cache"))
    cached = cached_artifacts(checkpoint, "edge", 64)
    assert cached.name.endswith("-tv1")  # the layout is in the key
    assert load_manifest(cached)["teacher_views"] == 1

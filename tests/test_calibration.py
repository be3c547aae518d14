"""INT8 (QDQ) and FP16 artifacts: graph hygiene, CPU execution, and the Dice report."""

import json

import numpy as np
import onnx
import pytest
from grata.calibration.evaluate import compare
from grata.calibration.quantize import (
    ADAPTED_INPUTS,
    adapted_nodes,
    check_qdq_graph,
    convert_fp16,
    list_images,
    quantize_artifacts,
)
from grata.export import load_manifest
from grata.runtime import OrtEngine
from onnx import numpy_helper

from grata.adapt import run
from grata.cli import main
from grata.decode import load_image
from grata.errors import GrataError
from grata.synth import SOURCE_DOMAIN, TARGET_DOMAINS, generate

SIZE = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory, edge64):
    """A small synthetic benchmark, the session's structured edge artifacts (64x64) as
    fp32, and their INT8 version calibrated (min-max) on the 6 source images."""
    root = tmp_path_factory.mktemp("calib")
    generate(root / "data", seed=5, n_source=(6, 0), n_target=(3, 2), size=96, progress=False)
    (root / "fp32").symlink_to(edge64[1], target_is_directory=True)
    images = root / "data" / SOURCE_DOMAIN / "train" / "image"
    quantize_artifacts(root / "fp32", images, root / "int8", method="minmax")
    return root


def _graph(folder):
    m = load_manifest(folder)
    return onnx.load(str(folder / m["graphs"]["infer"])), m


def _sign_agreement(a, b):
    return float(((a > 0) == (b > 0)).mean())


def test_int8_graph_is_standard_qdq_with_float_theta(setup):
    model, manifest = _graph(setup / "int8")
    assert manifest["precision"]["infer"] == "int8-qdq"
    assert manifest["precision"]["entropy_grad"] == "fp32"
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # TensorRT-consumable
    counts = check_qdq_graph(setup / "int8" / manifest["graphs"]["infer"])
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert len(convs) == counts["Conv"] + counts["ConvTranspose"] == 30
    for node in convs:
        x_dq, w_dq = producer[node.input[0]], producer[node.input[1]]
        assert x_dq.op_type == w_dq.op_type == "DequantizeLinear", node.name
        # symmetric int8 activations (zero point 0), as TensorRT requires
        assert inits[x_dq.input[2]].dtype == np.int8 and not inits[x_dq.input[2]].any()
        w = inits[w_dq.input[0]]
        assert w.dtype == np.int8
        # 7-bit weights: x86 without VNNI sums int8 pairs in saturating int16
        assert np.abs(w.astype(np.int32)).max() <= 64
        axis = {a.name: a.i for a in w_dq.attribute}.get("axis", 1)
        out_axis = 0 if node.op_type == "Conv" else 1   # per output channel
        assert axis == out_axis and inits[w_dq.input[1]].shape == (w.shape[out_axis],)
    for node in model.graph.node:
        if node.op_type == "InstanceNormalization":  # scale and bias: float slices of theta
            for name in node.input[1:]:
                assert producer[name].op_type == "Slice" and producer[name].input[0] == "theta"
    assert [i.name for i in model.graph.input] == ["image", "theta"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
               for i in model.graph.input)


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_int8_runs_on_cpu_and_follows_an_adapted_theta(setup):
    fp32, int8 = OrtEngine(setup / "fp32", threads=1), OrtEngine(setup / "int8", threads=1)
    x = fp32.to_input(load_image(list_images(setup / "data" / TARGET_DOMAINS[0])[0], SIZE))
    a, b = fp32.infer(x), int8.infer(x)
    assert b.dtype == np.float32 and b.shape == (1, 2, SIZE, SIZE)
    assert 0 < np.abs(a - b).max()  # really quantised
    # A random 25-layer network quantised from 6 images: close, not equal (measured
    # correlation 0.95; a trained model keeps Dice within a point, see BENCHMARKS.md).
    assert _corr(a, b) > 0.9
    # A moved theta (as adaptation moves it, larger): the INT8 prediction moves with it.
    # Were theta folded in as a constant, the INT8 change would be zero.
    rng = np.random.default_rng(1)
    moved = (fp32.theta0 + 0.2 * rng.standard_normal(fp32.theta0.shape)).astype(np.float32)
    fp32.theta[...] = moved
    int8.theta[...] = moved
    a2, b2 = fp32.infer(x), int8.infer(x)
    assert np.linalg.norm(a2 - a) > 0.5 * np.linalg.norm(a)  # the move matters ...
    assert _corr(a2 - a, b2 - b) > 0.75                      # ... and INT8 follows it


def test_calibrators_are_selectable_and_differ(setup, tmp_path):
    images = list_images(setup / "data" / SOURCE_DOMAIN / "train" / "image", limit=3)
    scales = {}
    for method in ("minmax", "percentile", "entropy"):
        m = quantize_artifacts(setup / "fp32", images, tmp_path / method, method=method,
                               per_channel=False, bins=256)
        assert m["quantization"]["calibrator"] == method
        assert m["quantization"]["calibration_images"] == 3
        model, _ = _graph(tmp_path / method)
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
        scales[method] = np.array([float(inits[n.input[1]]) for n in q])
    assert not np.allclose(scales["minmax"], scales["entropy"])
    assert not np.allclose(scales["minmax"], scales["percentile"])
    # min-max covers everything it saw: the others clip, so their scales are not larger
    assert (scales["percentile"] <= scales["minmax"] * (1 + 1e-6)).all()
    with pytest.raises(GrataError, match="unknown calibration method"):
        quantize_artifacts(setup / "fp32", images, tmp_path / "x", method="mse")
    with pytest.raises(GrataError, match="no images"):
        quantize_artifacts(setup / "fp32", tmp_path / "minmax", tmp_path / "x")
    with pytest.raises(GrataError, match="at least 256"):
        quantize_artifacts(setup / "fp32", images, tmp_path / "x", method="entropy", bins=128)
    with pytest.raises(GrataError, match="must differ"):
        quantize_artifacts(setup / "fp32", images, setup / "fp32")


def test_report_numbers_are_the_adaptation_loop_numbers(setup, tmp_path):
    out = tmp_path / "cal"
    target = TARGET_DOMAINS[1]
    rc = main(["calibrate", "--artifacts", str(setup / "fp32"),
               "--images", str(setup / "data" / SOURCE_DOMAIN / "train" / "image"),
               "--method", "minmax",
               "--max-images", "4", "--data", str(setup / "data"), "--targets", target,
               "--threads", "1", "--quiet", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quantization"]["calibration_images"] == 4
    sizes = report["model_size"]
    assert sizes["int8"]["infer_bytes"] < 0.4 * sizes["fp32"]["infer_bytes"]
    ev = report["evaluation"]
    assert ev["targets"] == [target] and ev["methods"] == ["bn", "grata"]
    for variant, folder in (("fp32", setup / "fp32"), ("int8", out / "int8")):
        results = run(lambda f=folder: OrtEngine(f, threads=1), setup / "data", [target],
                      SIZE, ["bn", "grata"], "domain", 0, progress=False)
        for res in results:
            s = res.summary()
            row = next(r for r in ev["rows"] if r["method"] == s["method"])
            assert row["n_images"] == s["n_images"] == 5
            for key in ("dice_od", "dice_oc", "dice_mean"):
                assert row[variant][key] == pytest.approx(s[key], abs=1e-9), (variant, key)
    row = ev["rows"][0]
    assert row["int8"]["delta_dice_mean"] == pytest.approx(
        row["int8"]["dice_mean"] - row["fp32"]["dice_mean"])


def test_compare_flags_a_variant_beyond_one_point():
    def rep(dice):
        return {"results": [{"method": "bn", "target": "A", "n_images": 1, "dice_od": dice,
                             "dice_oc": dice, "dice_mean": dice}],
                "mean_over_targets": {"bn": {"dice_od": dice, "dice_oc": dice,
                                             "dice_mean": dice}}}
    c = compare({"fp32": rep(80.0), "good": rep(79.2), "bad": rep(78.8)})
    assert c["within_tolerance"] == {"good": True, "bad": False}
    assert c["mean_over_targets"]["bn"]["bad"]["delta_dice_mean"] == pytest.approx(-1.2)


def test_fp16_artifacts_run_and_agree(setup, tmp_path):
    m = convert_fp16(setup / "fp32", tmp_path / "fp16")
    assert set(m["precision"].values()) == {"fp16"}
    load_manifest(tmp_path / "fp16")  # digests verified
    model = onnx.load(str(tmp_path / "fp16" / m["graphs"]["entropy_grad"]))
    types = {t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    # the frozen weights are stored once for all graphs
    assert (tmp_path / "fp16" / "weights.bin").stat().st_size < \
        0.6 * (setup / "fp32" / "weights.bin").stat().st_size
    ref, half = OrtEngine(setup / "fp32", threads=1), OrtEngine(tmp_path / "fp16", threads=1)
    x = ref.to_input(load_image(list_images(setup / "data" / TARGET_DOMAINS[2])[0], SIZE))
    assert _sign_agreement(ref.infer(x), half.infer(x)) >= 0.98
    _, g32 = ref.entropy_grad(x)
    _, g16 = half.entropy_grad(x)
    assert g16.dtype == np.float32
    cos = float(g32 @ g16 / (np.linalg.norm(g32) * np.linalg.norm(g16)))
    assert cos > 0.99


def test_fp16_graphs_follow_a_theta_step_of_1e5(setup, tmp_path):
    """A gamma of about 1 has a float16 spacing of about 1e-3: were theta rounded to
    float16 anywhere on its way to the normalisation, Adam steps of 1e-5 would vanish.
    gamma values exactly representable in float16, moved by 1e-5, must move the output."""
    m = convert_fp16(setup / "fp32", tmp_path / "fp16")
    assert m["fp16"]["adapted_inputs"] == list(ADAPTED_INPUTS)
    half = OrtEngine(tmp_path / "fp16", threads=1)
    x = half.to_input(load_image(list_images(setup / "data" / TARGET_DOMAINS[0])[0], SIZE))
    gamma = np.abs(half.theta0) >= 0.5  # the BN scales (the shifts are small)
    base = np.where(gamma, half.theta0.astype(np.float16).astype(np.float32), half.theta0)
    moved = base + np.where(gamma, np.float32(1e-5), np.float32(0))
    assert np.array_equal(moved.astype(np.float16), base.astype(np.float16))  # same in fp16
    for role in ("infer", "infer_source"):  # InstanceNormalization, BatchNormalization
        s = half.sessions[role]
        a = s.run(["logits"], {"image": x, "theta": base.astype(np.float32)})[0]
        b = s.run(["logits"], {"image": x, "theta": moved.astype(np.float32)})[0]
        assert np.abs(a - b).max() > 0, role
    # every node that reads theta stays float32 in the converted graphs: no Cast to
    # float16 on theta's path
    model = onnx.load(str(tmp_path / "fp16" / m["graphs"]["infer"]), load_external_data=False)
    path, meet = adapted_nodes(model)
    kinds = {n.name: n.op_type for n in model.graph.node}
    assert {kinds[n] for n in path} == {"Slice"}
    assert {kinds[n] for n in meet} == {"InstanceNormalization"}
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.name in meet:
            for name in node.input[1:]:
                assert producer[name].op_type == "Slice" and producer[name].input[0] == "theta"


def test_int8_graph_keeps_theta_and_its_arithmetic_float(setup):
    _, manifest = _graph(setup / "int8")
    model = onnx.load(str(setup / "int8" / manifest["graphs"]["infer"]),
                      load_external_data=False)
    path, meet = adapted_nodes(model)
    kinds = {n.name: n.op_type for n in model.graph.node}
    assert path and not {kinds[n] for n in path} & {"QuantizeLinear", "DequantizeLinear"}
    assert {kinds[n] for n in meet} == {"InstanceNormalization"}

"""grata bench: statistics on a fake clock, the JSON report, and the reference's maths."""

import json
import platform

import numpy as np
import pytest
import torch
from grata.export import EXPORT_REVISION, export_artifacts

from grata.bench import FORWARDS_PER_IMAGE, STAGES, measure, percentile, stages_plan, summarize
from grata.bench.reference import AuthorsGraTa
from grata.cli import main
from grata.errors import GrataError
from grata.methods import create
from grata.models import ResUnet, flops

SIZE = 64
STAT_KEYS = {"n", "min_ms", "mean_ms", "median_ms", "p90_ms", "p99_ms", "max_ms", "std_ms",
             "throughput_per_s", "total_s"}


class FakeClock:
    """Returns the given timestamps in order; counts the calls of the timed function."""

    def __init__(self, durations):
        stamps = [0.0]
        for d in durations:
            stamps += [stamps[-1] + 1.0, stamps[-1] + 1.0 + d]  # gap, then the call
        self.stamps = iter(stamps[1:])
        self.calls = 0

    def __call__(self):
        return next(self.stamps)

    def fn(self):
        self.calls += 1


@pytest.mark.parametrize("n", [1, 2, 7, 10, 101])
def test_percentile_matches_numpy(n):
    x = np.random.default_rng(n).exponential(size=n)
    for q in (0, 1, 10, 25, 50, 90, 99, 100):
        assert percentile(x, q) == pytest.approx(np.percentile(x, q), rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError):
        percentile(x, 101)


def test_measure_on_a_fake_clock_and_its_statistics():
    durations = list(np.random.default_rng(3).uniform(0.01, 0.2, size=23))
    clock = FakeClock(durations)
    times = measure(clock.fn, warmup=4, iterations=23, clock=clock)
    assert clock.calls == 27                      # warm-up calls are made, not timed
    np.testing.assert_allclose(times, durations, rtol=0, atol=1e-12)
    s = summarize(times)
    assert set(s) == STAT_KEYS and s["n"] == 23
    ms = np.array(durations) * 1e3
    for key, ref in (("min_ms", ms.min()), ("max_ms", ms.max()), ("mean_ms", ms.mean()),
                     ("median_ms", np.median(ms)), ("p90_ms", np.percentile(ms, 90)),
                     ("p99_ms", np.percentile(ms, 99)), ("std_ms", ms.std())):
        assert s[key] == pytest.approx(ref, rel=1e-9), key
    assert s["throughput_per_s"] == pytest.approx(1e3 / ms.mean())


def test_measure_for_a_duration():
    clock = FakeClock([0.3] * 10)
    times = measure(clock.fn, warmup=0, iterations=None, duration=1.0, clock=clock)
    assert len(times) == 4  # 0.3, 0.6, 0.9 < 1.0 <= 1.2
    assert summarize([])["n"] == 0
    with pytest.raises(ValueError):
        measure(clock.fn, iterations=None, duration=None)


def test_plan_skips_what_a_backend_cannot_run():
    plan = stages_plan(["onnx-cpu", "torch-cpu", "onnx-tensorrt"], None)
    assert ("onnx-cpu", "fp32", None) in plan and ("onnx-cpu", "int8", None) in plan
    assert not any(b == "onnx-cpu" and p == "fp16" for b, p, _ in plan)  # not on a CPU
    assert ("onnx-tensorrt", "fp16", None) in plan
    assert next(r for b, p, r in plan if b == "torch-cpu" and p == "int8")
    with pytest.raises(GrataError, match="unknown backend"):
        stages_plan(["onnx-npu"], None)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Random edge artifacts, exported where `grata bench adapt` keeps its own (the same
    model: torch.manual_seed(0)), so the adapt suite finds them in the cache."""
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    folder = root / "cache" / "bench" / f"edge-{SIZE}-seed0-x{EXPORT_REVISION}-tv1"
    export_artifacts(ResUnet("edge"), "edge", SIZE, folder, teacher_views=1)
    (root / "fp32").symlink_to(folder)
    return root


def test_stages_report_schema(artifacts, tmp_path, monkeypatch, capsys):
    from grata.calibration.quantize import quantize_artifacts
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib"
    calib.mkdir()
    from PIL import Image
    for i in range(2):
        Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(
            calib / f"{i}.png")
    quantize_artifacts(artifacts / "fp32", calib, tmp_path / "int8", method="minmax")
    monkeypatch.setenv("GRATA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    rc = main(["bench", "--artifacts", str(artifacts / "fp32"), "--int8", str(tmp_path / "int8"),
               "--backends", "onnx-cpu,torch-cpu", "--precisions", "fp32,int8",
               "--warmup", "1", "--iterations", "3", "--threads", "1", "--quiet",
               "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "onnx-cpu" in table and "p99" in table and "skipped" in table
    r = json.loads(out.read_text())
    assert r["format_version"] == 1 and r["suite"] == "stages"
    assert {"cpu", "logical_cpus", "physical_cores", "platform", "load_average",
            "date_utc", "memory_bytes"} <= set(r["machine"])
    assert {"grata", "python", "numpy", "onnxruntime"} <= set(r["versions"])
    s = r["settings"]
    assert (s["arch"], s["size"], s["warmup"], s["iterations"], s["threads"]) == \
        ("edge", SIZE, 1, 3, 1)
    assert s["malloc"] == {"setting": "large", "MALLOC_MMAP_THRESHOLD_": "33554432",
                           "MALLOC_TRIM_THRESHOLD_": "67108864"}
    rows = {(x["backend"], x["precision"]): x for x in r["results"]}
    assert set(rows) == {("onnx-cpu", "fp32"), ("onnx-cpu", "int8"), ("torch-cpu", "fp32"),
                         ("torch-cpu", "int8")}
    assert rows[("torch-cpu", "int8")]["skipped"]
    assert rows[("onnx-cpu", "int8")]["artifacts"] == str(tmp_path / "int8")
    for key in (("onnx-cpu", "fp32"), ("onnx-cpu", "int8"), ("torch-cpu", "fp32")):
        row = rows[key]
        assert row["error"] is None, row["error"]
        assert list(row["stages"]) == list(STAGES)
        assert row["engine"] == ("OrtEngine" if key[0] == "onnx-cpu" else "TorchEngine")
        # the worker really ran with these settings
        assert row["env"] == {k: v for k, v in s["malloc"].items() if k != "setting"}
        for st in row["stages"].values():
            assert set(st) == STAT_KEYS and st["n"] == 3
            assert st["min_ms"] <= st["median_ms"] <= st["p90_ms"] <= st["p99_ms"] <= \
                st["max_ms"]
            assert st["min_ms"] > 0
        mem = row["memory"]
        assert mem["peak_rss_bytes"] >= mem["rss_after_setup_bytes"] > 0
        assert mem["device_peak_bytes"] is None  # no GPU here
    # the onnx worker never imported torch, so its memory is its own
    assert rows[("onnx-cpu", "fp32")]["memory"]["peak_rss_bytes"] < \
        rows[("torch-cpu", "fp32")]["memory"]["peak_rss_bytes"]


def test_adapt_report_and_a_failing_worker(artifacts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRATA_CACHE", str(artifacts / "cache"))
    out = tmp_path / "adapt.json"
    rc = main(["bench", "adapt", "--archs", "edge", "--sizes", str(SIZE), "--images", "2",
               "--warmup", "0", "--threads", "1", "--backends",
               ("onnx,torch-ref,onnx:opt=bogus,onnx:teacher=6+arena=shared,"
                "torch-ref:heap=keep"),
               "--matmul", "256", "--limit-reps", "1",
               "--quiet", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "%limit" in table and "start s" in table and "error" in table
    assert "faults" in table
    r = json.loads(out.read_text())
    assert r["suite"] == "adapt" and r["matmul"]["numpy_gflops"] > 0
    assert r["matmul"]["n"] == 256
    rows = {x["backend"]: x for x in r["results"]}
    torch.manual_seed(0)
    forward = flops(ResUnet("edge"), SIZE)
    for name in ("onnx", "torch-ref"):
        row = rows[name]
        assert row["error"] is None, row["error"]
        assert row["per_image"]["n"] == len(row["times_s"]) == 2
        assert row["flops_per_image"] == FORWARDS_PER_IMAGE * forward
        assert row["gflops_per_s"] == pytest.approx(
            row["flops_per_image"] / (row["per_image"]["median_ms"] / 1e3) / 1e9)
        # the limit: the forward's FLOPs over the convolutions' median time, same worker
        lim = row["limit"]
        assert lim["reps"] == 1 and lim["gflops_per_s"] == pytest.approx(
            forward / lim["forward_s"] / 1e9)
        assert row["limit_fraction"] == pytest.approx(row["gflops_per_s"] /
                                                      lim["gflops_per_s"])
        assert 0 < row["startup_s"] < row["wall_s"]
        assert row["load_before"] and row["load_after"]
        assert isinstance(row["faults_per_image"], int) and row["faults_per_image"] >= 0
    # the runtime keeps its heap; the reference only when asked (for comparison)
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert rows["onnx"]["memory"]["heap_kept"] is glibc
    assert rows["torch-ref"]["memory"]["heap_kept"] is False
    assert rows["torch-ref:heap=keep"]["memory"]["heap_kept"] is glibc
    assert rows["onnx"]["teacher_views"] == 1 and rows["torch-ref"]["teacher_views"] is None
    assert rows["onnx:teacher=6+arena=shared"]["error"] is None
    assert rows["onnx:teacher=6+arena=shared"]["teacher_views"] == 6
    tv6 = f"edge-{SIZE}-seed0-x{EXPORT_REVISION}-tv6"
    assert (artifacts / "cache" / "bench" / tv6 / "manifest.json").exists()
    # the ratio is onnx's median over torch-ref's median, recomputed from the rows
    assert rows["onnx"]["time_vs_torch_ref"] == pytest.approx(
        rows["onnx"]["per_image"]["median_ms"] / rows["torch-ref"]["per_image"]["median_ms"])
    assert rows["onnx"]["torch_imported"] is False
    assert "opt=bogus" in rows["onnx:opt=bogus"]["error"]
    assert main(["bench", "adapt", "--archs", "edge", "--sizes", str(SIZE),
                 "--backends", "onnx:teacher=4", "--quiet", "--json", str(out)]) == 2
    assert "teacher=4: choose from 1, 2, 3, 6" in capsys.readouterr().err
    assert main(["bench", "adapt", "--archs", "edge", "--sizes", str(SIZE),
                 "--backends", "torch-ref:arena=1", "--quiet", "--json", str(out)]) == 2
    assert "torch backends take only heap" in capsys.readouterr().err


def test_conv_graph_is_the_models_convolutions(tmp_path):
    import onnxruntime as ort
    from grata.runtime.ort_session import session_options

    from grata.bench.convlimit import conv_graph
    info = conv_graph("edge", SIZE, 0, tmp_path / "convs.onnx")
    torch.manual_seed(0)
    model = ResUnet("edge")
    convs = [m for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert info["layers"] == len(convs) and info["forward_flops"] == flops(model, SIZE)
    sess = ort.InferenceSession(info["path"], session_options(1),
                                providers=["CPUExecutionProvider"])
    # each layer is the model's own (weights, stride, padding): torch gives the same
    inputs = sess.get_inputs()
    for k in (0, len(inputs) - 1):
        x = np.random.default_rng(k).random(inputs[k].shape, dtype=np.float32)
        feeds = {i.name: np.zeros(i.shape, np.float32) for i in inputs}
        feeds[inputs[k].name] = x
        got = sess.run([f"y{k}"], feeds)[0]
        with torch.no_grad():
            ref = convs[k](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.fixture
def one_thread():
    # Tiny ops: one thread is fastest, and two OpenMP threads on busy shared cores can be
    # a hundred times slower (barriers waiting out time slices).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_reference_step_is_the_grata_step(one_thread):
    torch.manual_seed(1)
    a, b = ResUnet("edge"), ResUnet("edge")
    b.load_state_dict(a.state_dict())
    ref = AuthorsGraTa(a, seed=7)
    method = create("grata", b, seed=7)
    rng = np.random.default_rng(0)
    for _ in range(2):  # the second step uses Adam's carried moments
        img = rng.random((3, SIZE, SIZE), dtype=np.float32)
        y_ref = ref.adapt(img)
        y = method.adapt(method.engine.to_input(img), image=img)
        # two float32 graphs of the same gradients, summed in other orders: measured up
        # to 1.4e-5 apart on some CPUs (oneDNN picks its kernels by instruction set)
        assert ref.last["cos"] == pytest.approx(float(method.last["cos"]), abs=5e-5)
        torch.testing.assert_close(y_ref, y, rtol=1e-4, atol=1e-4)
    theta_ref = torch.cat([p.detach().reshape(-1) for p in ref.params])
    theta0 = method.engine.theta0
    moved = (method.engine.theta - theta0).abs().max()
    assert moved > 1e-5
    # the same update to within a few float32 ulps of theta (~1)
    torch.testing.assert_close(theta_ref - theta0, method.engine.theta - theta0,
                               rtol=1e-3, atol=2.5e-7)


def test_onnx_variants_compute_what_the_runtime_computes(artifacts):
    from grata.runtime import OrtEngine

    from grata.bench import make_onnx_engine
    plain = make_onnx_engine(artifacts / "fp32", threads=1)
    assert type(plain) is OrtEngine  # nothing changed: the runtime's own engine
    variant = make_onnx_engine(artifacts / "fp32", threads=1,
                               options={"share": "0", "gradopt": "all", "opt": "extended",
                                        "spin": "0", "arena": "1"})
    assert variant.sessions.weights is None and plain.sessions.weights
    x = plain.to_input(np.random.default_rng(0).random((3, SIZE, SIZE), dtype=np.float32))
    # other optimisation level, other summation order: float32 rounding apart
    np.testing.assert_allclose(variant.infer(x), plain.infer(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(variant.entropy_grad(x)[1], plain.entropy_grad(x)[1],
                               rtol=1e-4, atol=1e-7)
    with pytest.raises(GrataError, match="unknown onnx option"):
        make_onnx_engine(artifacts / "fp32", options={"arenas": "1"})


# ----------------------------------------------------------------------------- scale stage

@pytest.fixture(scope="module")
def shipped():
    """The shipped model's artifacts (its disc scale in the manifest) and an engine."""
    from grata.artifacts import default_artifacts
    from grata.runtime import OrtEngine
    art = default_artifacts()[0]
    return art, OrtEngine(art, threads=1)


def test_scale_stream_counts_the_passes_and_a_settled_stream_spends_one(shipped):
    from grata.bench.scale_stream import run_stream, scale_crops
    from grata.disc_scale import DiscScale
    _, engine = shipped
    scale = DiscScale.from_json(engine.manifest["disc_scale"])
    calls, per_image = [], []

    def predict(x):  # the source model, counted here and not by the bench
        calls.append(1)
        return engine.infer(engine.to_input(x), norm="source")

    def step(x):  # the pipeline's step comes after the locate step: close the image
        assert x.shape == (3, engine.size, engine.size)
        per_image.append(len(calls) - sum(per_image))

    images = scale_crops(scale, engine.size, 0.5, 6)
    assert images[0].shape == (256, 256, 3)  # at side size / factor
    rows = run_stream("0.5x", images, predict, scale, engine.size, step)
    assert [r["passes"] for r in rows] == per_image and len(per_image) == 6
    assert [r["n_forward"] for r in rows] == per_image  # the record agrees with the count
    assert [r["extra"] for r in rows] == [max(0, n - 1) for n in per_image]
    settled = [n for r, n in zip(rows, per_image) if r["settled"]]
    first = [n for r, n in zip(rows, per_image) if not r["settled"]]
    assert len(first) == 3 and len(settled) == 3  # three estimates settle the stream
    assert max(first) >= 3  # the disc at half the model's size is searched for ...
    assert all(n == 1 for n in settled)  # ... and once settled: one source pass in all
    assert all(r["how"] == "stream" for r in rows if r["settled"])
    assert all(r["total_ms"] >= r["locate_ms"] > 0 for r in rows)


def test_bench_scale_stage_table_and_json(shipped, artifacts, tmp_path, monkeypatch, capsys):
    art, _ = shipped
    out = tmp_path / "bench.json"
    rc = main(["bench", "--artifacts", str(art), "--backends", "onnx-cpu", "--precisions",
               "fp32", "--stages", "scale", "--images", "4", "--warmup", "0",
               "--threads", "1", "--quiet", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "scale stage, onnx-cpu fp32" in table and "settled streams: at most" in table
    (row,) = json.loads(out.read_text())["results"]
    assert row["error"] is None, row["error"]
    sc = row["scale"]
    images = sc["images"]
    assert [r["stream"] for r in images] == [s for s in ("0.5x", "1.2x", "1.6x")
                                             for _ in range(4)]
    assert row["stages"]["scale"]["n"] == len(images) == 12
    settled = [r for r in images if r["settled"]]
    assert sc["settled"]["images"] == len(settled) and \
        sc["settled"]["extra_max"] == max(r["extra"] for r in settled) <= 1
    assert sc["first"]["passes_max"] == max(r["passes"] for r in images if not r["settled"])
    # a model whose disc scale is unknown: one line
    monkeypatch.setenv("GRATA_CACHE", str(tmp_path / "cache"))
    assert main(["bench", "--artifacts", str(artifacts / "fp32"), "--backends", "onnx-cpu",
                 "--precisions", "fp32", "--stages", "scale", "--quiet", "--json",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "--stages scale: disc scale: unknown" in err and "Traceback" not in err

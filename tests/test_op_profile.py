"""benchmarks/op_profile.py and the engine's `profile` setting: the profile's node times
are the graphs' own (every operator of the three GraTa graphs appears, the shares add up),
and profiling changes no answer."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import onnx
from grata.export import load_manifest
from grata.runtime import OrtEngine

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "op_profile.py"


def _module():
    spec = importlib.util.spec_from_file_location("op_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_setting_writes_every_node_and_changes_nothing(edge64, tmp_path):
    _, folder = edge64
    rng = np.random.default_rng(0)
    x = rng.random((1, 3, 64, 64), dtype=np.float32)
    plain = OrtEngine(folder, threads=1)
    profiled = OrtEngine(folder, threads=1, tuning={"profile": str(tmp_path / "p")})
    for name in ("entropy_grad", "infer"):
        a, b = getattr(plain, name)(x), getattr(profiled, name)(x)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            np.testing.assert_array_equal(u, v)
    path = Path(profiled.sessions["entropy_grad"].end_profiling())
    assert path.name.startswith("p-grad")
    times = _module().node_times(path)
    m = load_manifest(folder)
    graph = onnx.load(str(folder / m["graphs"]["entropy_grad"]), load_external_data=False)
    # the operators onnxruntime runs: the graph's own, less what it folds or fuses away
    assert {"Conv", "BatchNormalization", "Mul"} <= set(times) <= \
        {n.op_type for n in graph.graph.node} | {"FusedConv", "MemcpyToHost"}
    assert all(v > 0 for v in times.values())
    events = json.loads(path.read_text())
    assert sum(e["dur"] for e in events if e.get("cat") == "Node"
               and e["name"].endswith("_kernel_time")) == sum(times.values())


def test_table_shares_add_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRATA_CACHE", str(tmp_path))
    module = _module()
    monkeypatch.setattr("sys.argv", ["op_profile", "--size", "64", "--threads", "1",
                                     "--images", "1", "--top", "50"])
    module.main()
    out = capsys.readouterr().out
    kinds = re.findall(r"^  (\S.*?)\s+[\d.]+ ms\s+([\d.]+) %$", out, re.MULTILINE)
    ops = re.findall(r"^    (\S+)\s+[\d.]+ ms\s+([\d.]+) %$", out, re.MULTILINE)
    assert {k for k, _ in kinds} == {"convolution", "instance norm",
                                     "elementwise, reductions, layout"}
    assert abs(sum(float(p) for _, p in kinds) - 100) < 0.5
    assert abs(sum(float(p) for _, p in ops) - 100) < 0.5 + 0.05 * len(ops)

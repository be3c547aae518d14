"""onnxruntime settings in one place: torch-free, the documented defaults, providers."""

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from grata.errors import GrataError
from grata.runtime.ort_session import PROVIDERS, provider_list, session_options, tuned_options


def test_manifest_and_session_options_do_not_import_torch():
    code = ("import sys; import grata.export as e; from grata.export import manifest; "
            "from grata.runtime import ort_session; o = ort_session.session_options(3); "
            "assert o.intra_op_num_threads == 3 and not o.enable_cpu_mem_arena;"
            "assert not o.enable_mem_pattern;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _physical_cores_capped() -> int:
    import os
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(),
                       (topo / "core_id").read_text().strip()))
        except OSError:
            return len(os.sched_getaffinity(0))
    n = len(cores)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


def test_session_options_defaults():
    opts = session_options()
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # the default is the physical cores capped by a cgroup quota, both read here directly
    assert opts.intra_op_num_threads == _physical_cores_capped()
    assert session_options(2).intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    assert not opts.enable_cpu_mem_arena and not opts.enable_mem_pattern


def test_provider_list_per_device():
    assert provider_list("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(GrataError, match="unknown device 'gpu'"):
        provider_list("gpu")
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(GrataError, match="lacks"):
            provider_list("tensorrt", "fp16")
    assert PROVIDERS["cuda"][-1] == "CPUExecutionProvider"


def _entry(opts, key):
    try:
        return opts.get_session_config_entry(key)
    except Exception:  # noqa: BLE001  (onnxruntime raises when unset)
        return None


def test_engine_defaults_and_what_tuning_changes():
    options, share = tuned_options(2, {})
    plain = session_options(2)
    fwd, grad = options(False), options(True)
    assert share and options(True) is grad  # one options object per kind of graph
    for opts in (fwd, grad):
        for attr in ("intra_op_num_threads", "enable_cpu_mem_arena", "enable_mem_pattern",
                     "inter_op_num_threads"):
            assert getattr(opts, attr) == getattr(plain, attr)
        assert _entry(opts, "session.force_spinning_stop") == "1"
    # the forward graphs skip the NCHWc layout transform too (its kernel copies)
    assert fwd.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert grad.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    # backward nodes run when needed (fewer activations alive at once)
    assert fwd.execution_order == grad.execution_order == ort.ExecutionOrder.PRIORITY_BASED
    assert plain.execution_order == ort.ExecutionOrder.DEFAULT
    options, share = tuned_options(2, {"arena": "1", "share": "0", "threads": "3",
                                       "gradopt": "all", "spin": "0", "order": "default"})
    grad = options(True)
    assert grad.enable_cpu_mem_arena and grad.enable_mem_pattern and not share
    assert grad.intra_op_num_threads == 3
    assert grad.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert grad.execution_order == ort.ExecutionOrder.DEFAULT
    assert _entry(grad, "session.intra_op.allow_spinning") == "0"
    assert _entry(grad, "session.force_spinning_stop") is None
    with pytest.raises(GrataError, match="unknown onnx option 'arenas'"):
        tuned_options(1, {"arenas": "1"})
    with pytest.raises(GrataError, match="opt=fast: choose from"):
        tuned_options(1, {"opt": "fast"})
    with pytest.raises(GrataError, match="order=lifo: choose from priority, default"):
        tuned_options(1, {"order": "lifo"})
    with pytest.raises(GrataError, match="heap=huge: choose from keep, system"):
        tuned_options(1, {"heap": "huge"})

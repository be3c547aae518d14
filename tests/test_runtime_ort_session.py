"""onnxruntime settings in one place: torch-free, the documented defaults, providers."""

import subprocess
import sys

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


def test_session_options_defaults():
    opts = session_options()
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert 1 <= opts.intra_op_num_threads
    assert not opts.enable_cpu_mem_arena and not opts.enable_mem_pattern


def test_provider_list_per_device():
    assert provider_list("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(GrataError, match="unknown device 'gpu'"):
        provider_list("gpu")
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(GrataError, match="lacks"):
            provider_list("tensorrt", "fp16")
    assert PROVIDERS["cuda"][-1] == "CPUExecutionProvider"


def test_tuning_changes_only_what_it_names():
    opts, roles, share = tuned_options(2, {})
    plain = session_options(2)
    for attr in ("graph_optimization_level", "intra_op_num_threads", "enable_cpu_mem_arena",
                 "enable_mem_pattern", "inter_op_num_threads"):
        assert getattr(opts, attr) == getattr(plain, attr)
    assert (roles, share) == ("all", False)
    opts, roles, share = tuned_options(2, {"arena": "1", "roles": "grata", "share": "1",
                                           "threads": "3"})
    assert opts.enable_cpu_mem_arena and opts.enable_mem_pattern
    assert opts.intra_op_num_threads == 3 and (roles, share) == ("grata", True)
    with pytest.raises(GrataError, match="unknown onnx option 'arenas'"):
        tuned_options(1, {"arenas": "1"})

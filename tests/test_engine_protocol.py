"""Every engine answers the whole `Engine` protocol (what the methods and the pipeline
use): checked on the classes by inspection (the CUDA engine cannot be made without a
GPU) and on real instances of the torch and onnxruntime engines; and the chooser makes
the engine each (kind, device) names."""

import ast
import inspect
import textwrap

import pytest
from grata.runtime.cuda_engine import CudaEngine
from grata.runtime.ort_engine import OrtEngine

from grata.engine_chooser import engine_factory, open_engine
from grata.engine_protocol import Engine, protocol_members
from grata.errors import GrataError
from grata.models import ResUnet
from grata.torch_engine import TorchEngine

ENGINES = [TorchEngine, OrtEngine, CudaEngine]


def assigned_attributes(cls) -> set[str]:
    """Names a class or its bases set as ``self.NAME = ...`` (or annotate) in any method."""
    names = set()
    for klass in cls.__mro__[:-1]:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            for t in targets:
                for leaf in ast.walk(t):
                    if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) \
                            and leaf.value.id == "self":
                        names.add(leaf.attr)
    return names


def missing_members(cls) -> list[str]:
    """Protocol members `cls` lacks, and methods whose parameters do not take the
    protocol's (by name and order; extra parameters need defaults)."""
    attributes, methods = protocol_members()
    have = set(dir(cls)) | assigned_attributes(cls)
    out = [a for a in attributes if a not in have]
    for name, params in methods.items():
        fn = getattr(cls, name, None)
        if not callable(fn):
            out.append(f"{name}()")
            continue
        got = list(inspect.signature(fn).parameters.values())
        if isinstance(inspect.getattr_static(cls, name), staticmethod):
            params = params[1:]  # no self
        names = [p.name for p in got]
        extra = [p for p in got[len(params):] if p.default is inspect.Parameter.empty
                 and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if names[:len(params)] != params:
            out.append(f"{name}{tuple(params)}: has {tuple(names)}")
        elif extra:
            out.append(f"{name}: required {[p.name for p in extra]}")
    return out


def test_protocol_lists_what_methods_and_the_pipeline_use():
    attributes, methods = protocol_members()
    assert {"norm_state", "load_norm_state", "infer", "entropy_grad",
            "consistency_grad"} <= set(methods)
    assert methods["entropy_grad"] == ["self", "x", "norm"]
    assert {"stats", "stats0", "img_stats", "layout", "size", "theta0"} <= set(attributes)


@pytest.mark.parametrize("cls", ENGINES, ids=lambda c: c.__name__)
def test_each_engine_class_has_every_protocol_member(cls):
    assert missing_members(cls) == []


def test_the_check_finds_a_missing_member():
    class Partial(OrtEngine):
        norm_state = None  # not callable: the stream statistics cannot be read

        def infer(self, x):  # no statistics rule
            return x

    assert missing_members(Partial) == ["norm_state()", "infer('self', 'x', 'norm'): has "
                                                         "('self', 'x')"]


def test_real_engines_are_engines(edge64):
    ckpt, art = edge64
    torch_engine = open_engine(kind="torch", checkpoint=ckpt, arch="edge")
    ort_engine = open_engine(art, threads=1)
    for e in (torch_engine, ort_engine):
        assert isinstance(e, Engine)
        attributes, _ = protocol_members()
        assert all(hasattr(e, a) for a in attributes)
    assert type(torch_engine) is TorchEngine and type(ort_engine) is OrtEngine
    assert torch_engine.size is None and ort_engine.size == 64


def test_the_chooser_picks_the_engine_of_kind_and_device(edge64, monkeypatch):
    ckpt, art = edge64
    model = ResUnet("edge")
    e = open_engine(kind="torch", model=model)
    assert type(e) is TorchEngine and e.model is model and e.device == "cpu"
    made = []
    monkeypatch.setattr("grata.runtime.cuda_engine.CudaEngine.__init__",
                        lambda self, *a, **k: made.append((a, k)))
    assert type(open_engine(art, "cuda", 2)) is CudaEngine
    assert made == [((art,), {"threads": 2, "verify": True})]
    with pytest.raises(GrataError, match="unknown engine 'jax'"):
        open_engine(art, kind="jax")
    with pytest.raises(GrataError, match="unknown device 'tpu'"):
        open_engine(art, "tpu")
    with pytest.raises(GrataError, match="unknown device 'tpu'"):
        engine_factory("onnx", artifacts=art, device="tpu")
    make = engine_factory("torch", checkpoint=ckpt, arch="edge")
    assert type(make()) is TorchEngine and make() is not make()

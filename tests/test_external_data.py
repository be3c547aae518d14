"""External data of the artifact graphs: every location is checked before any session
exists (relative, inside the folder, no symlink leaving it, listed in the manifest), by a
protobuf reader that needs neither onnx nor onnxruntime; judged against onnx's own parser."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from grata.export import load_manifest
from grata.export.manifest import write_manifest
from grata.export.protoscan import ProtoError, external_tensors
from onnx import TensorProto, helper

from grata.errors import GrataError

ort = pytest.importorskip("onnxruntime")


def _onnx_reference(model: onnx.ModelProto) -> list[tuple[str, list]]:
    """(name, external_data entries) of every external tensor, found with onnx's classes."""
    found = []

    def tensor(t):
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            found.append((t.name, [(e.key, e.value) for e in t.external_data]))

    def attrs(attributes):
        for a in attributes:
            if a.HasField("t"):
                tensor(a.t)
            for t in a.tensors:
                tensor(t)
            if a.HasField("sparse_tensor"):
                tensor(a.sparse_tensor.values)
                tensor(a.sparse_tensor.indices)
            for s in a.sparse_tensors:
                tensor(s.values)
                tensor(s.indices)
            if a.HasField("g"):
                graph(a.g)
            for g in a.graphs:
                graph(g)

    def graph(g):
        for n in g.node:
            attrs(n.attribute)
        for t in g.initializer:
            tensor(t)
        for s in g.sparse_initializer:
            tensor(s.values)
            tensor(s.indices)

    graph(model.graph)
    for f in model.functions:
        for n in f.node:
            attrs(n.attribute)
    return found


def _ext(name, location, n=4, offset=0):
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[n],
                    data_location=TensorProto.EXTERNAL)
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(4 * n))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _nested_model(location="weights.bin") -> onnx.ModelProto:
    """External tensors in an initializer, a Constant attribute, a sparse initializer and
    inside both branches of an If."""
    then = helper.make_graph([helper.make_node("Constant", [], ["c"], value=_ext("T", location))],
                             "then", [], [helper.make_tensor_value_info("c", 1, [4])])
    other = helper.make_graph([helper.make_node("Identity", ["E"], ["c2"])], "else", [],
                              [helper.make_tensor_value_info("c2", 1, [4])],
                              [_ext("E", location, offset=16)])
    sparse = helper.make_sparse_tensor(_ext("S", location, n=1), helper.make_tensor(
        "S_idx", TensorProto.INT64, [1], [2]), [4])
    g = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=_ext("K", location)),
         helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", 1, [4])], [_ext("W", location)])
    g.sparse_initializer.append(sparse)
    return helper.make_model(g)


def test_scanner_matches_onnx_on_the_exported_graphs_and_nested_tensors(edge64):
    _, art = edge64
    manifest = load_manifest(art)
    for name in manifest["graphs"].values():
        data = (art / name).read_bytes()
        ref = _onnx_reference(onnx.load_from_string(data))
        got = [(t.name, t.entries) for t in external_tensors(data)]
        assert got == ref and len(got) > 10
    model = _nested_model()
    got = [(t.name, t.entries) for t in external_tensors(model.SerializeToString())]
    assert got == _onnx_reference(model)
    assert sorted(n for n, _ in got) == ["E", "K", "S", "T", "W"]


def test_scanner_refuses_malformed_bytes(edge64):
    _, art = edge64
    data = (art / "infer.onnx").read_bytes()
    for bad in (data[:-3], b"\x0a\xff\xff\xff\xff\x0f", b"\x00\x01", b"\x0b"):
        with pytest.raises(ProtoError):
            external_tensors(bad)


def _tampered(art, tmp_path, location, name="tampered"):
    """A copy of the artifacts whose infer graph points its first weight at `location`,
    with the manifest's digests recomputed (as anyone can)."""
    d = shutil.copytree(art, tmp_path / name)
    model = onnx.load(str(d / "infer.onnx"), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    for e in t.external_data:
        if e.key == "location":
            e.value = location
    (d / "infer.onnx").write_bytes(model.SerializeToString())
    _rewrite_manifest(d)
    return d


def _rewrite_manifest(d):
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").unlink()
    write_manifest(d, {k: v for k, v in m.items()
                       if k not in ("format_version", "sha256", "manifest_sha256")})


def _refused_before_any_session(folder, monkeypatch, *words, unverified=True):
    from grata.runtime import OrtEngine

    def no_session(*a, **k):
        raise AssertionError("a session was created before the check")
    monkeypatch.setattr(ort, "InferenceSession", no_session)
    calls = [lambda: load_manifest(folder), lambda: OrtEngine(folder)]
    if unverified:  # paths are checked even when the digests are not
        calls += [lambda: load_manifest(folder, verify=False),
                  lambda: OrtEngine(folder, verify=False)]
    for call in calls:
        with pytest.raises(GrataError) as err:
            call()
        msg = str(err.value)
        assert msg and "\n" not in msg, msg
        for w in words:
            assert w in msg, msg


def test_locations_outside_the_folder_are_refused(edge64, tmp_path, monkeypatch):
    _, art = edge64
    outside = tmp_path / "outside.bin"
    shutil.copy(art / "weights.bin", outside)  # valid bytes, would load if followed
    for i, (loc, words) in enumerate([
            ("../outside.bin", ["leaves the artifact folder"]),
            (str(outside), ["not a relative path"]),
            ("x/../../outside.bin", ["leaves the artifact folder"]),
            ("..\\outside.bin", ["not a relative path"]),
            ("notes.bin", ["not a file listed"])]):
        d = _tampered(art, tmp_path, loc, f"t{i}")
        # inside the folder but not in the manifest (put there after the digests)
        shutil.copy(art / "weights.bin", d / "notes.bin")
        _refused_before_any_session(d, monkeypatch, "infer.onnx", *words)
        monkeypatch.undo()


def test_weights_symlinked_out_of_the_folder_is_refused(edge64, tmp_path, monkeypatch):
    _, art = edge64
    d = shutil.copytree(art, tmp_path / "linked")
    outside = tmp_path / "elsewhere.bin"
    (d / "weights.bin").rename(outside)
    (d / "weights.bin").symlink_to(outside)  # same bytes: every digest still matches
    _refused_before_any_session(d, monkeypatch, "weights.bin", "symlink")


def test_out_of_range_offset_is_refused(edge64, tmp_path, monkeypatch):
    _, art = edge64
    d = shutil.copytree(art, tmp_path / "range")
    model = onnx.load(str(d / "infer.onnx"), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    for e in t.external_data:
        if e.key == "offset":
            e.value = str((art / "weights.bin").stat().st_size)
    (d / "infer.onnx").write_bytes(model.SerializeToString())
    _rewrite_manifest(d)
    _refused_before_any_session(d, monkeypatch, "bytes", unverified=False)


def test_the_check_needs_neither_onnx_nor_torch(edge64):
    _, art = edge64
    code = ("import sys; sys.modules['onnx'] = None; sys.modules['torch'] = None\n"
            "from grata.export.manifest import load_manifest, check_external_data\n"
            f"m = load_manifest({str(art)!r}); check_external_data({str(art)!r}, m)\n"
            "assert 'onnxruntime' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_artifacts_reached_through_a_symlinked_folder_still_load(edge64, tmp_path):
    _, art = edge64
    link = tmp_path / "art"
    link.symlink_to(art, target_is_directory=True)
    assert load_manifest(link)["arch"] == "edge"
    np.testing.assert_array_equal(np.load(link / "theta0.npy"), np.load(art / "theta0.npy"))

"""Where an export may write: only into a new, empty or its own artifact folder, swapped in
atomically; every other --out is refused with one line and left untouched."""

from __future__ import annotations

import os
import shutil

import pytest
from grata.export import export_artifacts, load_manifest
from grata.export import output as gout

from grata.cli import main
from grata.errors import GrataError


def _tree(folder):
    """{relative path: bytes} of every file below `folder` (the folder's full content)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(out, *words):
    with pytest.raises(GrataError) as err:
        gout.check_out_folder(out)
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def _foreign(tmp_path, name="mine"):
    d = tmp_path / name
    d.mkdir()
    (d / "manifest.json").write_text('{"mine": true}\n')  # any file of that name
    (d / "thesis.tex").write_text("years of work")
    (d / "sub").mkdir()
    (d / "sub" / "data.csv").write_text("a,b\n")
    return d


def test_foreign_folder_with_a_manifest_json_is_refused_and_kept(edge64, tmp_path):
    ckpt, _ = edge64
    d = _foreign(tmp_path)
    before = _tree(d)
    with pytest.raises(GrataError, match="not an artifact folder"):
        export_artifacts(ckpt, "edge", 64, d)
    assert _tree(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp left beside


def test_out_dot_is_refused_and_the_current_folder_kept(edge64, tmp_path, monkeypatch,
                                                        capsys):
    ckpt, _ = edge64
    work = _foreign(tmp_path, "work")
    before = _tree(work)
    monkeypatch.chdir(work)
    for out in (".", "./", "..", str(work), str(tmp_path)):
        rc = main(["export", "--checkpoint", str(ckpt), "--arch", "edge", "--size", "64",
                   "--out", out])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert _tree(work) == before


def test_a_file_a_symlink_and_a_dangling_symlink_are_refused(edge64, tmp_path, capsys):
    ckpt, art = edge64
    f = tmp_path / "file.bin"
    f.write_bytes(b"keep me")
    _refused(f, "not a folder")
    own = tmp_path / "own"
    shutil.copytree(art, own)
    link = tmp_path / "link"
    link.symlink_to(own, target_is_directory=True)  # even to an artifact folder
    _refused(link, "symlink")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    _refused(dangling, "symlink")
    before = _tree(own)
    for out in (f, link, dangling):
        rc = main(["export", "--checkpoint", str(ckpt), "--arch", "edge", "--size", "64",
                   "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f.read_bytes() == b"keep me" and _tree(own) == before
    assert link.is_symlink() and dangling.is_symlink() and not (tmp_path / "nowhere").exists()


def test_an_artifact_folder_with_anything_more_or_changed_is_refused(edge64, tmp_path):
    _, art = edge64
    extra = shutil.copytree(art, tmp_path / "extra")
    (extra / "notes.txt").write_text("mine")
    _refused(extra, "notes.txt")
    sub = shutil.copytree(art, tmp_path / "sub")
    (sub / "runs").mkdir()
    _refused(sub, "runs")
    changed = shutil.copytree(art, tmp_path / "changed")
    with open(changed / "theta0.npy", "ab") as fh:
        fh.write(b"\0")
    _refused(changed, "does not verify")
    linked = shutil.copytree(art, tmp_path / "linked")
    outside = tmp_path / "outside.bin"
    os.replace(linked / "weights.bin", outside)
    (linked / "weights.bin").symlink_to(outside)
    _refused(linked)
    assert outside.exists()
    # what is allowed: a new path, an empty folder, an untouched artifact folder
    gout.check_out_folder(tmp_path / "new" / "deeper")
    (tmp_path / "empty").mkdir()
    gout.check_out_folder(tmp_path / "empty")
    gout.check_out_folder(shutil.copytree(art, tmp_path / "ok"))


def test_export_replaces_its_own_folder_and_leaves_nothing_beside(edge64, tmp_path):
    ckpt, art = edge64
    out = shutil.copytree(art, tmp_path / "art")
    old_inode = out.stat().st_ino
    manifest = export_artifacts(ckpt, "edge", 64, out, opset=18)
    assert manifest["opset"] == 18 == load_manifest(out)["opset"]
    assert out.stat().st_ino != old_inode  # a new folder was swapped in
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def _folder(parent, name, text):
    d = parent / name
    d.mkdir()
    (d / "a.txt").write_text(text)
    return d


@pytest.mark.parametrize("fallback", [False, True])
def test_swap_keeps_a_complete_folder_at_every_step(tmp_path, monkeypatch, fallback):
    # The folder checks are the subject of the tests above; here only the swap.
    monkeypatch.setattr(gout, "check_out_folder", lambda out: out)
    if fallback:
        monkeypatch.setattr(gout, "_exchange", lambda a, b: False)
    out = _folder(tmp_path, "out", "old")

    class Crash(BaseException):
        pass

    # a crash before the swap (in the fsync), during it, and after it (removing the old)
    real_rename, calls = os.rename, []

    def rename_crashing_second(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise Crash
        return real_rename(a, b)

    points = [("_fsync_tree", None), ("rmtree", None)]
    if fallback:
        points.append(("rename", rename_crashing_second))
    for what, fake in points:
        new = _folder(tmp_path, ".out.new", "new")

        def crash(*a, **k):
            raise Crash
        if what == "_fsync_tree":
            monkeypatch.setattr(gout, "_fsync_tree", crash)
        elif what == "rmtree":
            monkeypatch.setattr(gout.shutil, "rmtree", crash)
        else:
            monkeypatch.setattr(gout.os, "rename", fake)
        with pytest.raises(Crash):
            gout.replace_folder_atomically(new, out)
        monkeypatch.undo()
        monkeypatch.setattr(gout, "check_out_folder", lambda out: out)
        if fallback:
            monkeypatch.setattr(gout, "_exchange", lambda a, b: False)
        content = (out / "a.txt").read_text()
        assert content == ("new" if what == "rmtree" else "old"), what
        for p in tmp_path.iterdir():  # clean up the leftovers, keep `out` as old
            if p.name != "out":
                shutil.rmtree(p)
        (out / "a.txt").write_text("old")
    new = _folder(tmp_path, ".out.new", "new")
    gout.replace_folder_atomically(new, out)
    assert (out / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_grata_cache_export_still_works(edge64, tmp_path, monkeypatch):
    from grata.artifacts import cached_artifacts
    ckpt, _ = edge64
    monkeypatch.setenv("GRATA_CACHE", str(tmp_path / "cache"))
    folder = cached_artifacts(ckpt, "edge", 64, quiet=True)
    assert load_manifest(folder)["size"] == 64
    assert cached_artifacts(ckpt, "edge", 64, quiet=True) == folder  # reused
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]

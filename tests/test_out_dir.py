"""`grata adapt --out`: an existing file, a path under a file or an unwritable folder is one
line and exit 2 before any work (an image streamed, a model loaded)."""

from __future__ import annotations

import os

import pytest

import grata.adapt
from grata.cli import main
from grata.errors import GrataError
from grata.outdir import check_out_dir


@pytest.fixture
def no_work(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("work started before --out was checked")
    monkeypatch.setattr(grata.adapt, "run", refuse)
    monkeypatch.setattr("grata.domains.resolve_targets", refuse)


def _adapt(out, tmp_path):
    return main(["adapt", "--data", str(tmp_path / "no-data-needed"), "--backend", "torch",
                 "--quiet", "--out", str(out)])


def test_existing_file_and_path_under_a_file_are_one_line(tmp_path, capsys, no_work):
    f = tmp_path / "report.txt"
    f.write_text("keep")
    for out, words in ((f, "not a folder"), (f / "run", "not a folder")):
        assert _adapt(out, tmp_path) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, err
    assert f.read_text() == "keep"


def test_unwritable_folder_is_refused_before_work(tmp_path, capsys, monkeypatch, no_work):
    out = tmp_path / "run"
    out.mkdir()

    def denied(*a, **k):  # what a read-only folder or file system answers
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("grata.outdir.tempfile.mkstemp", denied)
    assert _adapt(out, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not writable" in err and "Permission denied" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_folder_for_real(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(GrataError, match="not writable"):
            check_out_dir(ro)
        with pytest.raises(GrataError, match="cannot be created"):
            check_out_dir(ro / "new" / "deeper")
    finally:
        ro.chmod(0o755)


def test_new_and_existing_folders_pass_and_nothing_is_left(tmp_path):
    assert check_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # nothing created by the check
    (tmp_path / "c").mkdir()
    check_out_dir(tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []

"""Where an export may write: refusing foreign folders and swapping folders atomically.

Torch-free. An export writes its files into a temp folder beside `out` and then puts that
folder in place. It only ever replaces a folder that it provably wrote itself: a folder
whose `manifest.json` verifies (own digest and every file's SHA-256) and which holds
nothing but that manifest and the regular files it lists. Anything else (a folder of
other files, the current folder, a file, a symlink) is refused with one line, so an
export never deletes data it did not make.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from pathlib import Path

from grata.atomic import fsync_dir
from grata.errors import GrataError

from grata.export.manifest import MANIFEST, load_manifest

_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths atomically
_AT_FDCWD = -100


def _owned_problem(out: Path) -> str | None:
    """Why the existing folder `out` is not one an export wrote (None when it is)."""
    try:
        entries = list(os.scandir(out))
    except OSError as exc:
        return f"cannot be listed ({exc.strerror or type(exc).__name__})"
    if not entries:
        return None
    names = {e.name for e in entries}
    if MANIFEST not in names:
        return f"holds other files and no {MANIFEST}"
    try:
        manifest = load_manifest(out, verify=True)
    except GrataError as exc:
        return f"holds a {MANIFEST} that does not verify ({exc})"
    listed = set(manifest["sha256"]) | {MANIFEST}
    extra = sorted(names - listed)
    if extra:
        return f"holds files its {MANIFEST} does not list (e.g. {extra[0]!r})"
    for e in entries:
        if e.is_symlink() or not e.is_file(follow_symlinks=False):
            return f"{e.name!r} is not a regular file"
    return None


def check_out_folder(out) -> Path:
    """Check that an export may write to `out` and return it as a Path.

    Allowed: a path that does not exist yet, an empty folder, or an artifact folder an
    export wrote (see the module docstring). Refused with a one-line `GrataError`: the
    current folder or one that contains it, a symlink, a file, anything else in a folder.
    """
    out = Path(out)
    where = f"export: --out {str(out)!r}"
    if out.name in ("", ".", ".."):
        raise GrataError(f"{where} names the current or a parent folder; give a new or "
                         f"an artifact folder")
    if out.is_symlink():
        raise GrataError(f"{where} is a symlink; give the real folder")
    if not out.exists():
        if out.parent.exists() and not out.parent.is_dir():
            raise GrataError(f"{where}: {str(out.parent)!r} is not a folder")
        return out
    if not out.is_dir():
        raise GrataError(f"{where} exists and is not a folder")
    try:
        cwd = Path.cwd().resolve()
        if cwd == out.resolve() or out.resolve() in cwd.parents:
            raise GrataError(f"{where} contains the current folder; give another folder")
    except OSError:  # the current folder was removed: nothing to protect there
        pass
    problem = _owned_problem(out)
    if problem:
        raise GrataError(f"{where} is not an artifact folder this export wrote: {problem}; "
                         f"nothing was changed")
    return out


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` in one atomic step (Linux renameat2); False where the
    system cannot (then the caller falls back to two renames)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot swap
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_folder_atomically(new, out) -> None:
    """Put the complete folder `new` at `out` (both in the same parent folder).

    `out` is checked again (`check_out_folder`) just before the swap. If it exists, the
    two are exchanged in one step where the system allows it (else `out` is renamed away,
    `new` renamed in); the old folder is then removed. A crash at any point leaves at
    `out` the old complete folder or the new one (in the two-rename fallback, a crash
    between the renames leaves the old one complete under a hidden name beside it).
    """
    new, out = Path(new), Path(out)
    if new.resolve().parent != out.resolve().parent:
        raise ValueError("replace_folder_atomically: new and out must share a parent")
    check_out_folder(out)
    _fsync_tree(new)
    parent = out.parent
    if not out.exists():
        os.rename(new, out)  # also replaces an empty folder created meanwhile
        fsync_dir(parent)
        return
    if _exchange(new, out):
        old = new
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=parent))
        os.rename(out, old)  # onto the empty placeholder: rename replaces it
        try:
            os.rename(new, out)
        except BaseException:
            os.rename(old, out)
            raise
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


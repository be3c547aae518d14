"""The artifact folder's manifest: writing it and checking a folder against it.

Torch-free (the device runtime imports it). An artifact folder holds `manifest.json` and
the files it lists; the manifest records the SHA-256 of every other file in the folder and
a digest of its own content (`manifest_sha256`, over the canonical JSON of all other
fields), so a changed byte anywhere is caught by `load_manifest`.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
from pathlib import Path, PureWindowsPath

import numpy as np

from grata.digest import file_sha256
from grata.disc_scale import DiscScale
from grata.errors import GrataError
from grata.export.protoscan import ProtoError, external_tensors

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROLES = ("infer", "entropy_grad", "consistency_grad")
PRECISIONS = ("fp32", "fp16", "int8")  # what a graph of an artifact folder may compute in
_REQUIRED = {"format_version": int, "arch": str, "size": int, "opset": int, "graphs": dict,
             "params": list, "theta0": str, "n_theta": int, "versions": dict,
             "sha256": dict, "manifest_sha256": str}


def _content_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def write_manifest(folder, fields: dict) -> dict:
    """Write `manifest.json` into `folder`: `fields` plus format_version, the SHA-256 of
    every other file in the folder and the manifest's own digest. Returns the manifest."""
    folder = Path(folder)
    manifest = {"format_version": FORMAT_VERSION, **fields}
    manifest["sha256"] = {p.name: file_sha256(p) for p in sorted(folder.iterdir())
                          if p.is_file() and p.name != MANIFEST}
    manifest["manifest_sha256"] = _content_digest(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _plain_name(name) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..")
            and "/" not in name and "\\" not in name)


def _location_problem(folder: Path, location: str, listed: dict, offset: str | None,
                      length: str | None, ranges: bool) -> str | None:
    """Why an external-data reference may not be read (None when it may)."""
    if not location:
        return "has no location"
    if ("\\" in location or location.startswith("/") or PureWindowsPath(location).drive
            or "\0" in location):
        return "is not a relative path inside the folder"
    norm = posixpath.normpath(location)
    if norm == ".." or norm.startswith("../"):
        return "leaves the artifact folder"
    if norm not in listed:
        return f"is not a file listed in {MANIFEST}"
    try:
        real = (folder / norm).resolve(strict=True)
        inside = real.parent == folder.resolve(strict=True)
        size = real.stat().st_size
    except (OSError, RuntimeError):
        return "cannot be resolved"
    if not inside or (folder / norm).is_symlink():
        return "is a symlink (artifact files must be regular files inside the folder)"
    if not ranges:
        return None
    try:
        start = int(offset) if offset is not None else 0
        count = int(length) if length is not None else size - start
    except ValueError:
        return "has a non-numeric offset or length"
    if start < 0 or count < 0 or start + count > size:
        return f"asks for bytes {start}..{start + count} of a {size}-byte file"
    return None


def load_theta0(folder, manifest: dict) -> np.ndarray:
    """The source theta of an artifact folder: a plain float32 .npy (never a pickle) of
    shape [n_theta] with finite values; anything else raises `GrataError` (one line)."""
    path = Path(folder) / manifest["theta0"]
    where = f"artifact {folder}: {manifest['theta0']}"
    try:
        theta0 = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, TypeError) as exc:
        text = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise GrataError(f"{where} is not a float32 .npy array ({text})") from None
    if not isinstance(theta0, np.ndarray) or theta0.dtype != np.float32:
        kind = getattr(theta0, "dtype", type(theta0).__name__)
        raise GrataError(f"{where} holds {kind}, expected float32")
    if theta0.shape != (manifest["n_theta"],):
        raise GrataError(f"{where} has shape {theta0.shape}, the manifest says "
                         f"({manifest['n_theta']},)")
    if not np.isfinite(theta0).all():
        raise GrataError(f"{where} holds NaN or infinite values")
    return theta0


def check_external_data(folder, manifest: dict, ranges: bool = True) -> None:
    """Check every external-data reference of every graph listed in `manifest` before
    any session reads it: the location must be a relative path that stays inside
    `folder` (no `..`, not absolute, no symlink leaving it), name a file listed in the
    manifest, and (with `ranges`) the offset/length must lie within that file. Raises `GrataError` (one
    line) otherwise. Reads the protobuf itself: needs neither onnx nor onnxruntime."""
    folder = Path(folder)
    listed = manifest["sha256"]
    for role, name in sorted(manifest["graphs"].items()):
        where = f"artifact {folder}: graph {name}"
        try:
            tensors = external_tensors((folder / name).read_bytes())
        except OSError as exc:
            raise GrataError(f"{where} cannot be read ({exc.strerror or exc})") from None
        except ProtoError as exc:
            raise GrataError(f"{where} is not a valid ONNX file ({exc})") from None
        for t in tensors:
            locations = t.values("location") or [""]
            offsets, lengths = t.values("offset"), t.values("length")
            if len(locations) > 1 or len(offsets) > 1 or len(lengths) > 1:
                raise GrataError(f"{where}: tensor {t.name!r:.80} repeats an external-data "
                                 f"key")
            problem = _location_problem(folder, locations[0], listed,
                                        offsets[0] if offsets else None,
                                        lengths[0] if lengths else None, ranges)
            if problem:
                raise GrataError(f"{where}: external data {locations[0]!r:.120} of tensor "
                                 f"{t.name!r:.80} {problem}; refused")


def load_manifest(folder, verify: bool = True) -> dict:
    """Read and check an artifact folder's manifest; return it as a dict.

    Always checks the format version, the fields, that every listed file exists and is a
    regular file (not a symlink), every graph's external-data references
    (`check_external_data`) and theta0 (`load_theta0`); with `verify` also the manifest's
    own digest and every file's SHA-256. Any problem raises `GrataError` with one line.
    """
    folder = Path(folder)
    where = f"artifact {folder}"
    path = folder / MANIFEST
    if not path.is_file():
        raise GrataError(f"{where}: {MANIFEST} not found")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GrataError(f"{where}: {MANIFEST} is not valid JSON "
                         f"({type(exc).__name__})") from None
    if not isinstance(manifest, dict):
        raise GrataError(f"{where}: {MANIFEST} is not a JSON object")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise GrataError(f"{where}: format_version {version!r} is not supported "
                         f"(expected {FORMAT_VERSION}); re-export the model")
    for key, typ in _REQUIRED.items():
        if key not in manifest:
            raise GrataError(f"{where}: {MANIFEST} lacks the field {key!r}")
        value = manifest[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise GrataError(f"{where}: field {key!r} should be a {typ.__name__}")
    if verify and manifest["manifest_sha256"] != _content_digest(manifest):
        raise GrataError(f"{where}: {MANIFEST} was modified (its digest does not match)")
    offset = 0
    for entry in manifest["params"]:  # theta's layout: consecutive, in order
        try:
            ok = entry["offset"] == offset and isinstance(entry["name"], str)
            size = _count(entry["shape"])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise GrataError(f"{where}: malformed params entry {entry!r:.80} in {MANIFEST}")
        offset += size
    if offset != manifest["n_theta"]:
        raise GrataError(f"{where}: params cover {offset} values, n_theta says "
                         f"{manifest['n_theta']}")
    if manifest.get("disc_scale") is not None:  # optional: older folders have none
        DiscScale.from_json(manifest["disc_scale"], f"{where}: field 'disc_scale'")
    missing_roles = [r for r in ROLES if r not in manifest["graphs"]]
    if missing_roles:
        raise GrataError(f"{where}: no graph for role {missing_roles[0]!r}")
    digests = manifest["sha256"]
    listed = list(manifest["graphs"].values()) + [manifest["theta0"]]
    for optional in ("weights", "stats0"):
        if optional in manifest:
            listed.append(manifest[optional])
    for name in listed + list(digests):
        if not _plain_name(name):
            raise GrataError(f"{where}: bad file name {name!r} in {MANIFEST}")
        if name not in digests:
            raise GrataError(f"{where}: {name} has no sha256 in {MANIFEST}")
    for name, digest in digests.items():
        f = folder / name
        if not f.is_file():
            raise GrataError(f"{where}: {name} is missing")
        if not stat.S_ISREG(os.lstat(f).st_mode):  # a digest says nothing about a link
            raise GrataError(f"{where}: {name} is a symlink; artifact files must be "
                             f"regular files inside the folder")
        if verify and file_sha256(f) != digest:
            raise GrataError(f"{where}: {name} does not match its sha256 (corrupt or "
                             f"modified)")
    # always (the paths): a session would follow them; the byte ranges with the contents
    check_external_data(folder, manifest, ranges=verify)
    load_theta0(folder, manifest)  # every engine reads it next: refuse junk here, in one line
    return manifest

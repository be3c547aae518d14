"""The artifact folder's manifest: writing it and checking a folder against it.

Torch-free (the device runtime imports it). An artifact folder holds `manifest.json` and
the files it lists; the manifest records the SHA-256 of every other file in the folder and
a digest of its own content (`manifest_sha256`, over the canonical JSON of all other
fields), so a changed byte anywhere is caught by `load_manifest`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from grata.errors import GrataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROLES = ("infer", "entropy_grad", "consistency_grad")
_REQUIRED = {"format_version": int, "arch": str, "size": int, "opset": int, "graphs": dict,
             "params": list, "theta0": str, "n_theta": int, "versions": dict,
             "sha256": dict, "manifest_sha256": str}


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def load_manifest(folder, verify: bool = True) -> dict:
    """Read and check an artifact folder's manifest; return it as a dict.

    Always checks the format version, the fields, and that every listed file exists; with
    `verify` also the manifest's own digest and every file's SHA-256. Any problem raises
    `GrataError` with one line.
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
        if verify and file_sha256(f) != digest:
            raise GrataError(f"{where}: {name} does not match its sha256 (corrupt or "
                             f"modified)")
    return manifest

"""Fundus ROI data: image/mask readers and the two benchmark layouts.

Conventions (see the specification, "Data conventions"):

- image -> float32 [3, S, S]: bilinear resize, then per-image min-max over all
  channels and pixels to [0, 1] (a constant image gives zeros). 8-bit images are
  resized by PIL in 8 bits, as the reference pipeline does; 16-bit grey in float.
- mask -> float32 [2, S, S] of {0, 1}: 8-bit grey (RGB read as grey), nearest
  resize; channel 0 = disc including cup (value < 255), channel 1 = cup (value == 0).
  16-bit masks are accepted in two unambiguous forms: values that fit 0..255 (8-bit
  labels stored in a 16-bit file) mean what they mean in 8 bits; a mask that uses the
  full range (maximum 65535) reads 65535 as background, 0 as cup, anything between as
  rim. Any other 16-bit mask is rejected with a DataError.
- layouts: the CSV layout of the reference (``<Domain>_train.csv`` then
  ``<Domain>_test.csv``, or one ``<Domain>.csv``; columns ``image,mask``, paths
  relative to the root) and the DoFE layout (``<Domain>/{train,test}/ROIs/{image,mask}``).
  An entry's name is its image path relative to the root (posix), which is unique.
  A CSV row may not leave the root (checked on the path text, so a root reached
  through a symlink works); CSV files win over a DoFE folder of the same domain name.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image

from .errors import DataError, GrataError

_SPLITS = ("train", "test")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # more than 8 bits per pixel


@dataclass(frozen=True)
class Entry:
    name: str
    image_path: Path
    mask_path: Path


@dataclass
class Sample:
    name: str
    image: np.ndarray   # float32 [3, S, S] in [0, 1]
    target: np.ndarray  # float32 [2, S, S] in {0, 1}: disc (incl. cup), cup
    image_path: Path


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


# ----------------------------------------------------------------------------- readers

def _open(path) -> Image.Image:
    """Open and fully decode; lazy decoding would let a truncated file through."""
    try:
        with Image.open(path) as img:
            img.load()
        return img
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(path, f"cannot read image: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


def _image_array(img: Image.Image, size: int, path) -> np.ndarray:
    if img.mode in _WIDE_MODES:
        # Resize in float so 16-bit values are neither clipped nor quantised to 8 bits.
        grey = Image.fromarray(np.asarray(img, dtype=np.float32), mode="F")
        grey = grey.resize((size, size), Image.BILINEAR)
        arr = np.repeat(np.asarray(grey, dtype=np.float32)[None], 3, axis=0)
    else:
        try:
            rgb = img.convert("RGB")  # grey is replicated, alpha dropped, palette expanded
        except ValueError as e:
            raise DataError(path, f"cannot read image: mode {img.mode}: {_one_line(e)}") from None
        rgb = rgb.resize((size, size), Image.BILINEAR)
        arr = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)
    lo, hi = float(arr.min()), float(arr.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise DataError(path, "cannot read image: non-finite pixel values")
    if hi <= lo:
        return np.zeros_like(arr)
    return np.ascontiguousarray((arr - lo) / (hi - lo), dtype=np.float32)


def _mask_grey(img: Image.Image, path) -> Image.Image:
    """The mask as an 8-bit grey image in the 255/128/0 encoding."""
    if img.mode not in _WIDE_MODES:
        return img.convert("L")
    v = np.asarray(img)
    top = float(v.max()) if v.size else 0.0
    if float(v.min()) < 0 or not np.isfinite(top):
        raise DataError(path, "mask has negative or non-finite values")
    if top <= 255:
        return Image.fromarray(v.astype(np.uint8), mode="L")
    if top == 65535:
        out = np.full(v.shape, 128, np.uint8)
        out[v == 65535] = 255
        out[v == 0] = 0
        return Image.fromarray(out, mode="L")
    raise DataError(path, f"16-bit mask with values up to {top:g}: expected 8-bit values "
                          "(0..255) or the full 16-bit range with 65535 as background")


def _mask_array(img: Image.Image, size: int, path) -> np.ndarray:
    grey = _mask_grey(img, path).resize((size, size), Image.NEAREST)
    v = np.asarray(grey)
    return np.stack([v < 255, v == 0]).astype(np.float32)


def load_image(path, size: int) -> np.ndarray:
    """Image file -> float32 [3, size, size], min-max scaled to [0, 1]."""
    return _image_array(_open(path), size, path)


def load_mask(path, size: int) -> np.ndarray:
    """Mask file -> float32 [2, size, size] of {0, 1}: disc (incl. cup), cup."""
    return _mask_array(_open(path), size, path)


def load_pair(image_path, mask_path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and target; the mask must have the image's size before resizing."""
    img = _open(image_path)
    mask = _open(mask_path)
    if img.size != mask.size:
        raise DataError(mask_path, f"mask is {mask.size[0]}x{mask.size[1]} but image "
                                   f"{image_path} is {img.size[0]}x{img.size[1]}")
    return _image_array(img, size, image_path), _mask_array(mask, size, mask_path)


def to_mask_png(pred) -> np.ndarray:
    """Prediction [2, H, W] (bool or probabilities, threshold 0.5) -> uint8 [H, W] mask
    in the file encoding: 255 background, 128 rim, 0 cup (a cup pixel outside the disc
    is still cup, so load_mask reads it back as disc and cup)."""
    p = np.asarray(pred)
    if p.ndim != 3 or p.shape[0] != 2:
        raise ValueError(f"expected a [2, H, W] prediction, got shape {p.shape}")
    disc, cup = p[0] >= 0.5, p[1] >= 0.5
    out = np.full(p.shape[1:], 255, np.uint8)
    out[disc] = 128
    out[cup] = 0
    return out


# ----------------------------------------------------------------------------- layouts

def _root(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise GrataError(f"{root}: data root does not exist or is not a folder")
    return root


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [c.strip() for c in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _csv_domains(root: Path) -> dict[str, list[Path]]:
    """Domain -> its CSV files in streaming order (train before test)."""
    split_files: dict[str, dict[str, Path]] = {}
    single: dict[str, Path] = {}
    for p in sorted(root.glob("*.csv")):
        stem = p.stem
        for split in _SPLITS:
            if stem.endswith("_" + split) and len(stem) > len(split) + 1:
                split_files.setdefault(stem[: -len(split) - 1], {})[split] = p
                break
        else:
            # A lone CSV is a domain only if it looks like one (results files are not).
            if {"image", "mask"} <= set(_csv_header(p)):
                single[stem] = p
    out = {d: [files[s] for s in _SPLITS if s in files] for d, files in split_files.items()}
    for d, p in single.items():
        out.setdefault(d, [p])  # <Domain>_train/_test win over a <Domain>.csv
    return out


def _dofe_domains(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir()
                  if d.is_dir() and any((d / s / "ROIs" / "image").is_dir() for s in _SPLITS))


def list_domains(root) -> list[str]:
    """Domain names found under root (CSV and DoFE layouts), sorted."""
    root = _root(root)
    return sorted(set(_csv_domains(root)) | set(_dofe_domains(root)))


def _inside(root: Path, rel: str) -> Path | None:
    """root/rel if rel is a relative path that stays inside root (checked lexically, so
    a root reached through a symlink still works), else None."""
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() \
            or PureWindowsPath(rel).drive:
        return None
    norm = os.path.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../") or norm == ".":
        return None
    return root / norm


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, cells) of the non-blank rows."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [c.strip() for c in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise GrataError(f"{path}: cannot read: {_one_line(e)}") from None
    return header, rows


def _csv_listing(root: Path, files: list[Path]) -> list[Entry | Skipped]:
    items: list[Entry | Skipped] = []
    for path in files:
        header, rows = _read_csv(path)
        if "image" not in header or "mask" not in header:
            raise GrataError(f"{path}: expected a header with columns image,mask, "
                             f"found {','.join(header) or 'nothing'}")
        ii, im = header.index("image"), header.index("mask")
        for line, row in rows:
            where = f"{path.name}:{line}"
            if len(row) <= max(ii, im) or not row[ii].strip() or not row[im].strip():
                items.append(Skipped(where, "malformed row: expected image,mask"))
                continue
            rel_img, rel_mask = row[ii].strip(), row[im].strip()
            items.append(_entry(root, rel_img.replace("\\", "/"), rel_img, rel_mask, where))
    return items


def _entry(root: Path, name: str, rel_img: str, rel_mask: str, where: str) -> Entry | Skipped:
    paths = []
    for what, rel in (("image", rel_img), ("mask", rel_mask)):
        p = _inside(root, rel)
        if p is None:
            return Skipped(name, f"{where}: {what} path {rel} is outside the data root")
        if not p.is_file():
            return Skipped(name, f"{where}: {what} file {p} does not exist")
        paths.append(p)
    return Entry(name, paths[0], paths[1])


def _dofe_listing(root: Path, domain: str, splits=_SPLITS) -> list[Entry | Skipped]:
    items: list[Entry | Skipped] = []
    for split in splits:
        rois = root / domain / split / "ROIs"
        if not (rois / "image").is_dir():
            continue
        for img in sorted(p for p in (rois / "image").iterdir()
                          if p.is_file() and p.suffix.lower() in _IMAGE_EXTS):
            name = img.relative_to(root).as_posix()
            masks = [rois / "mask" / img.name, rois / "mask" / (img.stem + ".png")]
            mask = next((m for m in masks if m.is_file()), None)
            if mask is None:
                items.append(Skipped(name, f"mask file {masks[0]} does not exist"))
            else:
                items.append(Entry(name, img, mask))
    return items


def _split_files(files: list[Path], splits) -> list[Path]:
    """The CSVs of the given splits; a domain with one CSV keeps it whatever the split."""
    if len(files) == 1 and not any(files[0].stem.endswith("_" + s) for s in _SPLITS):
        return files
    return [f for f in files if any(f.stem.endswith("_" + s) for s in splits)]


def _listing(root, domain: str, splits=_SPLITS) -> list[Entry | Skipped]:
    root = _root(root)
    csvs = _csv_domains(root)
    if domain in csvs:
        items = _csv_listing(root, _split_files(csvs[domain], splits))
    elif domain in _dofe_domains(root):
        items = _dofe_listing(root, domain, splits)
    else:
        raise GrataError(f"unknown domain {domain!r} in {root}; available: "
                         f"{', '.join(list_domains(root)) or 'none'}")
    if not any(isinstance(i, Entry) for i in items):
        first = next((f" (first problem: {i.name}: {i.reason})" for i in items), "")
        raise GrataError(f"domain {domain!r} in {root} has no usable images{first}; "
                         f"available: {', '.join(list_domains(root))}")
    return items


def domain_entries(root, domain: str, splits=_SPLITS
                   ) -> tuple[list[Entry], list[tuple[str, str]]]:
    """(entries in streaming order, [(name, reason)] of rows that cannot be used)."""
    items = _listing(root, domain, splits)
    return ([i for i in items if isinstance(i, Entry)],
            [(i.name, i.reason) for i in items if isinstance(i, Skipped)])


def stream_domain(root, domain: str, size: int, splits=_SPLITS
                  ) -> Iterator[Sample | Skipped]:
    """Samples of a target domain in streaming order; a file that cannot be listed or
    read becomes a Skipped in its place instead of stopping the stream."""
    for item in _listing(root, domain, splits):
        if isinstance(item, Skipped):
            yield item
            continue
        try:
            image, target = load_pair(item.image_path, item.mask_path, size)
        except DataError as e:
            yield Skipped(item.name, str(e))
            continue
        yield Sample(item.name, image, target, item.image_path)


def resolve_targets(root, source: str | None, targets: list[str] | None) -> list[str]:
    """The target domains to stream: those named (each must exist), else every domain but
    the source. A missing or empty choice is a GrataError naming what is available."""
    domains = list_domains(root)
    chosen = targets or [d for d in domains if d != source]
    missing = [t for t in chosen if t not in domains]
    if missing:
        raise GrataError(f"target domain {missing[0]!r} not in {root}; available: "
                         f"{', '.join(domains)}")
    if not chosen:
        raise GrataError(f"no target domains in {root} besides the source {source!r}")
    return chosen

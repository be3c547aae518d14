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
- mask conventions (`mask_convention`, decided on the full-size mask before resizing):
  ``spec`` 255 / 0 / one level in between (the specification; 0/128/255); ``spec-noisy``
  the same with JPEG noise: at least 99 % of the pixels within 24 grey levels of 0, 128
  or 255, read by the nearest of the three; ``labels`` 0/1/2 = background/rim/cup (a
  label map). Two-level masks (0/1, 0/255, either polarity) label one structure only: the
  cup is missing, and scoring them as disc+cup would put a cup Dice of about 0 into the
  domain mean, so they are skipped with a reason naming the convention, as is anything
  else (noise, many grey levels, no background).
- decoding is bounded: an image or mask above `max_pixels` (default 40 MP, or
  ``$GRATA_MAX_PIXELS``) is refused from its header, before any pixel is decoded; a JPEG
  image above it is decoded reduced (1/2 to 1/8, libjpeg's DCT scaling) when that brings
  it under the limit. Below the limit images decode in full, as the reference does.
- whole photographs (``stream_domain(..., roi=RoiOptions())``): read at their own
  resolution under the same limit, the disc localised (`grata.roi`) and the benchmark's
  ROI cut and read like a crop file; the sample keeps the full-size truth and the box
  (``Sample.photo``) so the prediction is scored pasted back; a photograph whose disc is
  not found is skipped with the reason.
- reasons are one line; file names in them are quoted (``repr``: newlines, control
  characters and undecodable bytes escaped), and never an object's repr.
- layouts: the CSV layout of the reference (``<Domain>_train.csv`` then
  ``<Domain>_test.csv``, or one ``<Domain>.csv``; columns ``image,mask``, paths
  relative to the root) and the DoFE layout (``<Domain>/{train,test}/ROIs/{image,mask}``).
  An entry's name is its image path relative to the root (posix), which is unique.
  A CSV row may not leave the root (checked on the path text, so a root reached
  through a symlink works); CSV files win over a DoFE folder of the same domain name.
"""

from __future__ import annotations

import csv
import io
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image

from grata import roi as roi_mod
from grata.errors import DataError, GrataError

_SPLITS = ("train", "test")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # more than 8 bits per pixel
MAX_PIXELS = 40_000_000  # default decoding limit (Pillow's own is 179 MP, 2x its warning)
MASK_TOLERANCE = 24      # grey levels of JPEG noise accepted around 0, 128 and 255
MASK_STRAY = 0.01        # at most this fraction of mask pixels farther from a level


@dataclass(frozen=True)
class Entry:
    name: str
    image_path: Path
    mask_path: Path


@dataclass(frozen=True)
class Photo:
    """What a whole photograph's sample carries besides its crop: where the crop came from
    and the full-size truth the pasted-back prediction is scored against."""

    box: tuple[int, int, int, int]  # the ROI in pixels of the photograph (may leave it)
    shape: tuple[int, int]          # (H, W) of the photograph as decoded
    target: np.ndarray              # bool [2, H, W]: disc (incl. cup), cup
    pixels: np.ndarray              # uint8 [H, W, 3]: the photograph (overlays)
    record: dict                    # grata.roi.record: box, score, centre, radius, FOV


@dataclass
class Sample:
    name: str
    image: np.ndarray   # float32 [3, S, S] in [0, 1]
    target: np.ndarray  # float32 [2, S, S] in {0, 1}: disc (incl. cup), cup
    image_path: Path
    photo: Photo | None = None  # set when the image is a crop of a whole photograph


@dataclass(frozen=True)
class RoiOptions:
    """How whole photographs become the model's crops (`stream_domain(..., roi=)`).

    ``threshold``: localisation score below which a photograph is skipped with its reason
    (never segmented blindly). ``discs``: a known disc per image name (``cx``, ``cy`` and
    ``fov`` with ``d``, as ``synth.json`` records them) used instead of localising: the
    crop at the true disc, which a benchmark compares the localiser against."""

    threshold: float = roi_mod.SCORE_THRESHOLD
    discs: Mapping[str, dict] | None = None


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


# ----------------------------------------------------------------------------- readers

def quote(name) -> str:
    """A file name for a reason or a log line: one printable line (repr of the text, so
    newlines, control characters and undecodable bytes are escaped)."""
    if isinstance(name, (bytes, bytearray)):
        name = os.fsdecode(bytes(name))
    if isinstance(name, (str, os.PathLike)):
        return repr(os.fspath(name) if not isinstance(name, str) else name)
    return f"<{type(name).__name__}>"  # a stream has no name: never its repr


def max_pixels(limit: int | None = None) -> int:
    """The decoding limit in pixels: `limit`, else $GRATA_MAX_PIXELS, else MAX_PIXELS."""
    if limit is not None:
        return int(limit)
    text = os.environ.get("GRATA_MAX_PIXELS", "").strip()
    if not text:
        return MAX_PIXELS
    try:
        value = int(float(text))
    except ValueError:
        raise GrataError(f"GRATA_MAX_PIXELS={text!r} is not a number of pixels") from None
    if value <= 0:
        raise GrataError(f"GRATA_MAX_PIXELS={text!r} must be positive")
    return value


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, Image.UnidentifiedImageError):
        text = "not an image format this reader knows"
    text = _OBJECT_REPR.sub("the data", text)  # Pillow names a stream by its repr
    return text[:200]


def _draft_scale(img: Image.Image, limit: int) -> tuple[int, int] | None:
    """The size to ask libjpeg for so a JPEG decodes under `limit` pixels (None if even
    1/8 is too large)."""
    w, h = img.size
    for scale in (2, 4, 8):
        rw, rh = -(-w // scale), -(-h // scale)
        if rw * rh <= limit:
            return rw, rh
    return None


def _open(path, limit: int | None = None, reduce: bool = False
          ) -> tuple[Image.Image, tuple[int, int]]:
    """Open, check the size from the header, then fully decode (lazy decoding would let a
    truncated file through). Returns the image and its size as stored. Above the pixel
    limit the file is refused before decoding, or (`reduce`, JPEG) decoded reduced."""
    limit = max_pixels(limit)
    where = quote(path)
    img = None
    try:
        with warnings.catch_warnings():  # our limit is lower than Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        size = img.size
        if size[0] * size[1] > limit:
            target = _draft_scale(img, limit) if reduce and img.format == "JPEG" else None
            if target is not None:
                img.draft(None, target)
            if target is None or img.size[0] * img.size[1] > limit:
                raise DataError(where, f"image is {size[0]}x{size[1]} "
                                       f"({size[0] * size[1] / 1e6:.0f} MP), above the "
                                       f"decoding limit of {limit / 1e6:g} MP "
                                       f"(GRATA_MAX_PIXELS)")
        with img:  # closes the file after decoding (also for multi-frame formats)
            img.load()
        return img, size
    except DataError:
        if img is not None:
            img.close()
        raise
    except Image.DecompressionBombError as e:
        raise DataError(where, f"cannot read image: {_one_line(e)}") from None
    except MemoryError:
        if img is not None:
            img.close()
        raise DataError(where, "cannot read image: out of memory while decoding") from None
    except Exception as e:  # noqa: BLE001  (a decoder fails on a hostile file in many ways)
        if img is not None:
            img.close()
        raise DataError(where, f"cannot read image: {_one_line(e)}") from None


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
    """The mask as an 8-bit grey image (16-bit masks mapped as the module says)."""
    if img.mode not in _WIDE_MODES:
        return img.convert("L")
    v = np.asarray(img)
    top = float(v.max()) if v.size else 0.0
    if float(v.min()) < 0 or not np.isfinite(top):
        raise DataError(quote(path), "mask has negative or non-finite values")
    if top <= 255:
        return Image.fromarray(v.astype(np.uint8), mode="L")
    if top == 65535:
        out = np.full(v.shape, 128, np.uint8)
        out[v == 65535] = 255
        out[v == 0] = 0
        return Image.fromarray(out, mode="L")
    raise DataError(quote(path), f"16-bit mask with values up to {top:g}: expected 8-bit values "
                          "(0..255) or the full 16-bit range with 65535 as background")


def _levels(h: np.ndarray) -> str:
    shown = [str(v) for v in np.flatnonzero(h)[:6]]
    return "/".join(shown) + ("/..." if np.count_nonzero(h) > 6 else "")


def mask_convention(grey) -> str:
    """The convention of a full-size 8-bit grey mask (uint8 array): ``spec`` (255
    background, 0 cup, one level in between rim), ``spec-noisy`` (the same with JPEG-like
    noise, see the module docstring) or ``labels`` (0/1/2 = background/rim/cup). A mask
    that follows none of them, labels one structure only or has no background raises
    ValueError with the reason (one line)."""
    v = np.asarray(grey)
    h = np.bincount(v.ravel(), minlength=256)[:256]
    present = set(np.flatnonzero(h).tolist())
    if present and present <= {0, 1, 2} and 2 in present:
        if 0 not in present:
            raise ValueError(f"label mask (values {_levels(h)}) has no background (0)")
        return "labels"
    if present in ({0, 1}, {0, 255}):
        raise ValueError(f"mask has one structure only (values {_levels(h)}): the cup is "
                         f"not labelled, so disc and cup cannot both be scored")
    if 255 in present and len(present - {0, 255}) <= 1:
        return "spec"
    t = MASK_TOLERANCE
    near = np.zeros(256, bool)
    near[: t + 1] = near[128 - t: 128 + t + 1] = near[255 - t:] = True
    stray = float(h[~near].sum()) / max(1, v.size)
    bg, rim, cup = int(h[192:].sum()), int(h[65:192].sum()), int(h[:65].sum())
    if stray > MASK_STRAY:
        raise ValueError(f"mask values follow no known convention ({len(present)} grey "
                         f"levels, {stray:.0%} of the pixels not within {t} of 0, 128 or "
                         f"255)")
    if bg == 0:
        raise ValueError(f"mask has no background (255; values {_levels(h)})")
    if cup and rim < 0.01 * (rim + cup):
        raise ValueError("mask has one structure only (values near 0 and 255, no rim): "
                         "the cup is not labelled, so disc and cup cannot both be scored")
    return "spec-noisy"


def _spec_levels(grey: np.ndarray, convention: str) -> np.ndarray:
    """The mask in the specification's 255/128/0 encoding."""
    if convention == "spec":
        return grey
    out = np.full(grey.shape, 128, np.uint8)
    if convention == "labels":
        out[grey == 0] = 255
        out[grey == 2] = 0
    else:  # spec-noisy: nearest of 0, 128, 255 (boundaries halfway)
        out[grey >= 192] = 255
        out[grey <= 64] = 0
    return out


def _mask_levels(img: Image.Image, path) -> Image.Image:
    """The full-size mask in the specification's 255/128/0 encoding, whatever recognised
    convention it was stored in (anything else is a DataError with the reason)."""
    grey = np.asarray(_mask_grey(img, path))
    try:
        convention = mask_convention(grey)
    except ValueError as e:
        raise DataError(quote(path), str(e)) from None
    return Image.fromarray(_spec_levels(grey, convention), mode="L")


def _mask_array(img: Image.Image, size: int, path) -> np.ndarray:
    v = np.asarray(_mask_levels(img, path).resize((size, size), Image.NEAREST))
    return np.stack([v < 255, v == 0]).astype(np.float32)


def load_image(path, size: int, limit: int | None = None) -> np.ndarray:
    """Image file -> float32 [3, size, size], min-max scaled to [0, 1]. `limit`: the
    decoding limit in pixels (default `max_pixels()`)."""
    img, _ = _open(path, limit, reduce=True)
    return _image_array(img, size, quote(path))


def load_mask(path, size: int, limit: int | None = None) -> np.ndarray:
    """Mask file -> float32 [2, size, size] of {0, 1}: disc (incl. cup), cup."""
    img, _ = _open(path, limit)
    return _mask_array(img, size, path)


def load_pair(image_path, mask_path, size: int, limit: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Image and target; the mask must have the image's size before resizing (both as
    stored: a JPEG image decoded reduced is compared at its stored size)."""
    img, mask = _open_pair(image_path, mask_path, limit)
    return _image_array(img, size, quote(image_path)), _mask_array(mask, size, mask_path)


def _open_pair(image_path, mask_path, limit: int | None) -> tuple[Image.Image, Image.Image]:
    """Image (a JPEG above the limit decoded reduced) and mask, decoded; the mask must
    have the image's size as stored."""
    img, img_size = _open(image_path, limit, reduce=True)
    mask, mask_size = _open(mask_path, limit)
    if img_size != mask_size:
        raise DataError(quote(mask_path), f"mask is {mask_size[0]}x{mask_size[1]} but "
                                          f"image {quote(image_path)} is "
                                          f"{img_size[0]}x{img_size[1]}")
    return img, mask


def _photo_rgb(img: Image.Image, path) -> np.ndarray:
    """The photograph as uint8 [H, W, 3] (wide grey scaled by its own range)."""
    if img.mode in _WIDE_MODES:
        v = np.asarray(img, dtype=np.float32)
        lo, hi = float(v.min()), float(v.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise DataError(path, "cannot read image: non-finite pixel values")
        v = np.zeros_like(v) if hi <= lo else (v - lo) / (hi - lo) * 255.0
        return np.repeat(np.round(v).astype(np.uint8)[..., None], 3, axis=2)
    try:
        return np.asarray(img.convert("RGB"))
    except ValueError as e:
        raise DataError(path, f"cannot read image: mode {img.mode}: {_one_line(e)}") from None


def load_photo_pair(image_path, mask_path, limit: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A whole photograph at its own resolution and its full-size target:
    (uint8 [H, W, 3], bool [2, H, W]). The decoding limit applies as in `load_pair`;
    the mask must have the image's stored size (and follows the image when it was
    decoded reduced)."""
    img, mask = _open_pair(image_path, mask_path, limit)
    pixels = _photo_rgb(img, quote(image_path))
    levels = _mask_levels(mask, mask_path)
    if levels.size != img.size:  # the image was decoded reduced
        levels = levels.resize(img.size, Image.NEAREST)
    v = np.asarray(levels)
    return pixels, np.stack([v < 255, v == 0])


def load_photo(path, limit: int | None = None) -> np.ndarray:
    """A whole photograph (a path or a binary file object) at its own resolution: uint8
    [H, W, 3]. The decoding limit applies as in `load_image` (JPEG decoded reduced when
    that fits)."""
    img, _ = _open(path, limit, reduce=True)
    with img:
        return _photo_rgb(img, quote(path))


def photo_input(crop: np.ndarray, size: int) -> np.ndarray:
    """A crop of a photograph (uint8 [h, w, 3]) -> the model's input float32 [3, S, S]:
    bilinear resize and min-max scaling, exactly as `load_image` reads a crop file."""
    return _image_array(Image.fromarray(np.ascontiguousarray(crop)), size, "<crop>")


def photo_sample(name: str, pixels: np.ndarray, target: np.ndarray, size: int,
                 roi: RoiOptions, image_path=None) -> Sample:
    """A whole photograph as a Sample: localise the disc (or take ``roi.discs[name]``),
    cut the ROI, resize it to S. Raises grata.roi.RoiRejected below ``roi.threshold``."""
    known = (roi.discs or {}).get(name)
    if known is not None:
        info = {"cx": float(known["cx"]), "cy": float(known["cy"]),
                "r": float(known.get("r", float("nan"))), "score": 1.0,
                "fov": {k: float(known["fov"][k]) for k in ("cx", "cy", "d")},
                "reason": "known disc"}
        box = roi_mod.roi_box(pixels.shape, info, info["fov"])
        crop = roi_mod.crop(pixels, box)
    else:
        crop, box, info = roi_mod.prepare(pixels, roi.threshold)
    crop_target = np.stack([roi_mod.crop(t.astype(np.uint8), box) for t in target])
    # The crop's own target (scored nowhere: metrics use the full-size one) keeps Sample's
    # [2, S, S] contract for callers that look at it.
    small = np.stack([np.asarray(Image.fromarray(t * 255).resize((size, size), Image.NEAREST))
                      for t in crop_target]) > 127
    photo = Photo(tuple(int(v) for v in box), tuple(pixels.shape[:2]), target, pixels,
                  roi_mod.record(info, box))
    return Sample(name, photo_input(crop, size), small.astype(np.float32), Path(image_path or name),
                  photo)


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


def _utf8(cell: str) -> bool:
    try:
        cell.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept as surrogates
        return False
    return True


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str] | str]]]:
    """Header and (line number, cells) of the non-blank rows; a row that cannot be
    parsed or is not UTF-8 comes as (line number, reason) instead of failing the file."""
    try:
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    except OSError as e:
        raise GrataError(f"{quote(path)}: cannot read: {e.strerror or _one_line(e)}") from None
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
    try:
        header = [c.strip() for c in next(reader, [])]
    except csv.Error as e:
        raise GrataError(f"{quote(path)}: cannot read the header: {_one_line(e)}") from None
    rows: list[tuple[int, list[str] | str]] = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # the reader goes on with the next line
            rows.append((reader.line_num, f"malformed row: {_one_line(e)}"))
            continue
        if not any(c.strip() for c in row):
            continue
        if not all(_utf8(c) for c in row):
            rows.append((reader.line_num, "row is not UTF-8 text"))
            continue
        rows.append((reader.line_num, row))
    return header, rows


def _csv_listing(root: Path, files: list[Path]) -> list[Entry | Skipped]:
    items: list[Entry | Skipped] = []
    for path in files:
        header, rows = _read_csv(path)
        if "image" not in header or "mask" not in header:
            found = ",".join(header) or "nothing"
            raise GrataError(f"{quote(path)}: expected a header with columns image,mask, "
                             f"found {quote(found)[1:-1][:120]}")
        ii, im = header.index("image"), header.index("mask")
        for line, row in rows:
            where = f"{path.name}:{line}"
            if isinstance(row, str):
                items.append(Skipped(where, row))
                continue
            if len(row) <= max(ii, im) or not row[ii].strip() or not row[im].strip():
                items.append(Skipped(where, "malformed row: expected image,mask"))
                continue
            rel_img, rel_mask = row[ii].strip(), row[im].strip()
            items.append(_entry(root, rel_img.replace("\\", "/"), rel_img, rel_mask, where))
    return items


def _file_problem(p: Path) -> str | None:
    """Why `p` cannot be read as a data file (None when it is a file)."""
    try:
        if p.is_file():
            return None
        return "is a folder, not a file" if p.is_dir() else "does not exist"
    except (OSError, ValueError) as e:  # a name too long, a NUL byte
        return f"cannot be looked up ({_one_line(e)})"


def _entry(root: Path, name: str, rel_img: str, rel_mask: str, where: str) -> Entry | Skipped:
    paths = []
    for what, rel in (("image", rel_img), ("mask", rel_mask)):
        p = _inside(root, rel)
        if p is None:
            return Skipped(name, f"{where}: {what} path {quote(rel)} is outside the data root")
        problem = _file_problem(p)
        if problem:
            return Skipped(name, f"{where}: {what} file {quote(p)} {problem}")
        paths.append(p)
    return Entry(name, paths[0], paths[1])


def _dofe_listing(root: Path, domain: str, splits=_SPLITS) -> list[Entry | Skipped]:
    items: list[Entry | Skipped] = []
    for split in splits:
        rois = root / domain / split / "ROIs"
        if not (rois / "image").is_dir():
            continue
        for img in sorted(p for p in (rois / "image").iterdir()
                          if p.suffix.lower() in _IMAGE_EXTS):
            name = img.relative_to(root).as_posix()
            problem = _file_problem(img)
            if problem:  # e.g. a folder named like an image
                items.append(Skipped(name, f"image {quote(img)} {problem}"))
                continue
            masks = [rois / "mask" / img.name, rois / "mask" / (img.stem + ".png")]
            mask = next((m for m in masks if _file_problem(m) is None), None)
            if mask is None:
                items.append(Skipped(name, f"mask file {quote(masks[0])} "
                                           f"{_file_problem(masks[0])}"))
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


def stream_domain(root, domain: str, size: int, splits=_SPLITS, roi: RoiOptions | None = None
                  ) -> Iterator[Sample | Skipped]:
    """Samples of a target domain in streaming order; a file that cannot be listed or
    read becomes a Skipped in its place instead of stopping the stream.

    With ``roi`` every image is a whole photograph: read at its own resolution, its disc
    localised and the benchmark's ROI cut and resized to S (`photo_sample`); the sample
    carries the full-size truth (``sample.photo``). A photograph whose disc is not found
    is a Skipped with the reason."""
    for item in _listing(root, domain, splits):
        if isinstance(item, Skipped):
            yield item
            continue
        try:
            if roi is not None:
                pixels, full = load_photo_pair(item.image_path, item.mask_path)
                try:
                    sample = photo_sample(item.name, pixels, full, size, roi, item.image_path)
                except roi_mod.RoiRejected as e:
                    sample = Skipped(item.name, f"optic disc not found: {e.reason} "
                                                f"(score {e.info.get('score', 0.0):.2f})")
                except GrataError as e:  # e.g. a photograph too small to be one
                    sample = Skipped(item.name, f"{quote(item.image_path)}: {e}")
                yield sample
                continue
            image, target = load_pair(item.image_path, item.mask_path, size)
        except DataError as e:
            yield Skipped(item.name, str(e))
            continue
        except GrataError:  # a setting is wrong (GRATA_MAX_PIXELS): every image would fail
            raise
        except Exception as e:  # noqa: BLE001  (one bad row never stops the stream)
            yield Skipped(item.name, f"{quote(item.image_path)}: cannot read: "
                                     f"{type(e).__name__}: {_one_line(e)}")
            continue
        yield Sample(item.name, image, target, item.image_path)


def validate_domains(root, domains: list[str]) -> None:
    """Check every domain before the first image: it exists, its CSV files are readable
    with an image,mask header, and it has at least one usable row. Raises one
    `GrataError` (one line) naming the first problem and how many domains have one.
    Rows that will be skipped (missing files, bad rows) are not problems here."""
    max_pixels()  # a bad GRATA_MAX_PIXELS is one line now, not a skip per image later
    problems = []
    for domain in domains:
        try:
            _listing(root, domain)
        except GrataError as e:
            problems.append((domain, str(e)))
    if problems:
        more = f" ({len(problems)} of {len(domains)} domains have problems)" \
            if len(problems) > 1 else ""
        raise GrataError(f"{problems[0][1]}{more}; nothing was run")


def resolve_targets(root, source: str | None, targets: list[str] | None) -> list[str]:
    """The target domains to stream: those named (each must exist), else every domain but
    the source; each is checked with `validate_domains`. A missing or empty choice is a
    GrataError naming what is available."""
    domains = list_domains(root)
    chosen = targets or [d for d in domains if d != source]
    missing = [t for t in chosen if t not in domains]
    if missing:
        raise GrataError(f"target domain {missing[0]!r} not in {root}; available: "
                         f"{', '.join(domains)}")
    if not chosen:
        raise GrataError(f"no target domains in {root} besides the source {source!r}")
    validate_domains(root, chosen)  # a bad later domain stops nothing midway
    return chosen

"""Decoding image and mask files, bounded: what the model reads of one file.

Conventions (see the specification, "Data conventions"):

- image -> float32 [3, S, S]: bilinear resize, then per-image min-max over all
  channels and pixels to [0, 1] (a constant image gives zeros). 8-bit images are
  resized by PIL in 8 bits, as the reference pipeline does; 16-bit grey in float.
- mask -> float32 [2, S, S] of {0, 1}: 8-bit grey (RGB read as grey), nearest
  resize; channel 0 = disc including cup, channel 1 = cup. What the grey levels mean
  (the conventions recognised, 16-bit masks) is `grata.masks`.
- decoding is bounded: an image or mask above `max_pixels` (default 40 MP, or
  ``$GRATA_MAX_PIXELS``) is refused from its header, before any pixel is decoded; a JPEG
  image above it is decoded reduced (1/2 to 1/8, libjpeg's DCT scaling) when that brings
  it under the limit. Below the limit images decode in full, as the reference does.
- whole photographs (`load_photo`, `load_photo_pair`) are read at their own resolution
  under the same limit; `photo_input` turns a crop of one into the model's input exactly
  as `load_image` reads a crop file.
- reasons are one line; file names in them are quoted (`quote`: newlines, control
  characters and undecodable bytes escaped), and never an object's repr (`one_line`).
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
from PIL import Image

from grata import masks
from grata.errors import DataError, GrataError

# The files a folder of images is read for (suffix compared lower-case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # more than 8 bits per pixel
MAX_PIXELS = 40_000_000  # default decoding limit (Pillow's own is 179 MP, 2x its warning)


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


def one_line(e: BaseException) -> str:
    """An exception as a reason: one line of at most 200 characters, never an object's
    repr (a decoder's message names the stream it read by its repr)."""
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
        raise DataError(where, _bomb_reason(e, limit)) from None
    except MemoryError:
        if img is not None:
            img.close()
        raise DataError(where, "cannot read image: out of memory while decoding") from None
    except Exception as e:  # noqa: BLE001  (a decoder fails on a hostile file in many ways)
        if img is not None:
            img.close()
        raise DataError(where, f"cannot read image: {one_line(e)}") from None


def _bomb_reason(e: Image.DecompressionBombError, limit: int) -> str:
    """The reason for a file Pillow refuses at open, before its size reaches our check
    (above twice Pillow's own limit, 179 MP): our limit's line where the file is above
    it, else that Pillow's bound holds whatever GRATA_MAX_PIXELS says."""
    found = re.search(r"\((\d+) pixels\)", str(e))
    if found is None:
        return f"cannot read image: {one_line(e)}"
    pixels = int(found.group(1))
    if pixels > limit:
        return (f"image is {pixels / 1e6:.0f} MP, above the decoding limit of "
                f"{limit / 1e6:g} MP (GRATA_MAX_PIXELS)")
    return (f"image is {pixels / 1e6:.0f} MP, above the image library's own bound of "
            f"{2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} MP, which GRATA_MAX_PIXELS "
            "does not lift")


def _image_array(img: Image.Image, size: int, path) -> np.ndarray:
    if img.mode in WIDE_MODES:
        # Resize in float so 16-bit values are neither clipped nor quantised to 8 bits.
        grey = Image.fromarray(np.asarray(img, dtype=np.float32), mode="F")
        grey = grey.resize((size, size), Image.BILINEAR)
        arr = np.repeat(np.asarray(grey, dtype=np.float32)[None], 3, axis=0)
    else:
        try:
            rgb = img.convert("RGB")  # grey is replicated, alpha dropped, palette expanded
        except ValueError as e:
            raise DataError(path, f"cannot read image: mode {img.mode}: {one_line(e)}") from None
        rgb = rgb.resize((size, size), Image.BILINEAR)
        arr = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)
    lo, hi = float(arr.min()), float(arr.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise DataError(path, "cannot read image: non-finite pixel values")
    if hi <= lo:
        return np.zeros_like(arr)
    return np.ascontiguousarray((arr - lo) / (hi - lo), dtype=np.float32)


def _mask_levels(img: Image.Image, path) -> Image.Image:
    """The full-size mask in the specification's 255/128/0 encoding, whatever recognised
    convention it was stored in (anything else is a DataError with the reason)."""
    try:
        grey = masks.wide_grey(np.asarray(img)) if img.mode in WIDE_MODES \
            else np.asarray(img.convert("L"))
        levels = masks.spec_levels(grey)
    except ValueError as e:
        raise DataError(quote(path), str(e)) from None
    return Image.fromarray(levels, mode="L")


def _mask_array(img: Image.Image, size: int, path) -> np.ndarray:
    levels = _mask_levels(img, path).resize((size, size), Image.NEAREST)
    return masks.target(np.asarray(levels)).astype(np.float32)


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
    if img.mode in WIDE_MODES:
        v = np.asarray(img, dtype=np.float32)
        lo, hi = float(v.min()), float(v.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise DataError(path, "cannot read image: non-finite pixel values")
        v = np.zeros_like(v) if hi <= lo else (v - lo) / (hi - lo) * 255.0
        return np.repeat(np.round(v).astype(np.uint8)[..., None], 3, axis=2)
    try:
        return np.asarray(img.convert("RGB"))
    except ValueError as e:
        raise DataError(path, f"cannot read image: mode {img.mode}: {one_line(e)}") from None


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
    return pixels, masks.target(np.asarray(levels))


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


def resize_target(target, size: int) -> np.ndarray:
    """A target (bool or 0/1 [2, h, w]) -> bool [2, S, S], resized by nearest neighbour as
    `load_mask` resizes a mask."""
    return np.stack([np.asarray(Image.fromarray(t.astype(np.uint8) * 255)
                                .resize((size, size), Image.NEAREST))
                     for t in target]) > 127

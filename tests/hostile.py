"""A generator of hostile inputs for fault-injection tests, on small data.

`write_corpus(root)` writes a CSV-layout domain whose rows are hostile cases (file names
that are long, not UTF-8 or hold a newline; truncated, empty, huge-dimension or
mis-named files; masks in wrong conventions; unreadable files; symlinks; folders named
like images; malformed CSV rows) between good rows, and returns one `Case` per row with
what a reader must make of it. `inbox_files(folder)` writes the same kind of files flat
into one folder (for a server's inbox). Everything is deterministic and a few MB at most.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 24  # side of the small images


@dataclass
class Case:
    """One CSV row: `expect` is "sample" (read normally) or "skip" (one Skipped whose
    reason holds every word of `words`)."""

    name: str
    expect: str
    words: tuple[str, ...] = ()
    row: bytes = b""  # the CSV line as written (bytes: it may not be UTF-8)
    files: list[bytes] = field(default_factory=list)


def image_array(seed: int, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(20, 220, (size, size, 3), dtype=np.uint8)


def spec_mask(size: int = SIZE) -> np.ndarray:
    m = np.full((size, size), 255, np.uint8)
    c = size // 2
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - c) ** 2 + (xx - c) ** 2
    m[r2 <= (size // 3) ** 2] = 128
    m[r2 <= (size // 6) ** 2] = 0
    return m


def png_bytes(array: np.ndarray, mode: str | None = None, fmt: str = "PNG", **kw) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, fmt, **kw)
    return buf.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit grey PNG of width x height, all black: a few KB on disk for any
    size (13000 x 13000 is about 20 KB), so only its header tells how large it is."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    parts = [z.compress(row) for _ in range(height)]
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


def _write(root: Path, rel: bytes, data: bytes) -> Path:
    path = Path(os.fsdecode(os.path.join(os.fsencode(root), rel)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _csv_field(rel: bytes) -> bytes:
    if any(c in rel for c in (b",", b'"', b"\n", b"\r")):
        return b'"' + rel.replace(b'"', b'""') + b'"'
    return rel


def write_corpus(root, domain: str = "Hostile", seed: int = 0) -> list[Case]:
    """Write `<domain>_test.csv` and its files under `root`; return the rows' cases in
    CSV order. Good rows come first, between and last, so the domain stays usable."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    d = domain.encode()
    good_png = png_bytes(image_array(seed))
    mask_png = png_bytes(spec_mask(), "L")
    trunc_png = png_bytes(image_array(seed + 1))
    jpeg = png_bytes(image_array(seed + 2), fmt="JPEG", quality=90)
    noise = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    binary = np.where(spec_mask() < 255, 255, 0).astype(np.uint8)
    colour = np.zeros((SIZE, SIZE, 3), np.uint8)
    colour[spec_mask() == 128] = (255, 0, 0)
    colour[spec_mask() == 0] = (0, 255, 0)
    root_is_admin = hasattr(os, "geteuid") and os.geteuid() == 0

    cases: list[Case] = []
    m = d + b"/mask.png"
    _write(root, m, mask_png)

    def add(name, expect, image: bytes | None, data: bytes | None, words=(),
            mask_rel: bytes = m, mask_data: bytes | None = None, row: bytes | None = None):
        if image is not None and data is not None:
            _write(root, image, data)
        if mask_data is not None:
            _write(root, mask_rel, mask_data)
        line = row if row is not None else _csv_field(image) + b"," + _csv_field(mask_rel)
        cases.append(Case(name, expect, tuple(words), line, [image or b""]))

    add("good first", "sample", d + b"/good0.png", good_png)
    long_name = d + b"/" + b"L" * 240 + b".png"  # 244 bytes: legal, and it reads
    add("244-byte file name", "sample", long_name, good_png)
    add("name longer than the system allows", "skip", d + b"/" + b"X" * 300 + b".png", None,
        ["cannot be looked up"])
    add("newline in a truncated file's name", "skip", d + b"/bad\nname.png",
        trunc_png[: len(trunc_png) // 2], ["cannot read image", "\\n"])
    add("not UTF-8 in the CSV row", "skip", d + b"/caf\xe9.png", good_png, ["not UTF-8"])
    add("truncated PNG", "skip", d + b"/trunc.png", trunc_png[: len(trunc_png) // 2],
        ["cannot read image"])
    add("truncated JPEG", "skip", d + b"/trunc.jpg", jpeg[: len(jpeg) // 2],
        ["cannot read image"])
    add("zero-byte file", "skip", d + b"/empty.png", b"", ["cannot read image"])
    add("text named .png", "skip", d + b"/text.png", b"hello, not an image\n",
        ["not an image format"])
    add("13000 x 13000 in a few KB", "skip", d + b"/huge.png", huge_png(13000, 13000),
        ["13000x13000", "decoding limit"], mask_rel=d + b"/huge_mask.png",
        mask_data=huge_png(13000, 13000))
    add("0/1 mask", "skip", d + b"/good1.png", good_png, ["one structure"],
        mask_rel=d + b"/m01.png", mask_data=png_bytes((binary // 255).astype(np.uint8), "L"))
    add("0/255 mask", "skip", d + b"/good2.png", good_png, ["one structure"],
        mask_rel=d + b"/m0255.png", mask_data=png_bytes(binary, "L"))
    add("noise mask", "skip", d + b"/good3.png", good_png, ["no known convention"],
        mask_rel=d + b"/mnoise.png", mask_data=png_bytes(noise, "L"))
    add("colour mask", "skip", d + b"/good4.png", good_png, ["convention"],
        mask_rel=d + b"/mcolour.png", mask_data=png_bytes(colour))
    add("mask of another size", "skip", d + b"/good5.png", good_png, ["but image"],
        mask_rel=d + b"/msmall.png", mask_data=png_bytes(spec_mask(SIZE - 2), "L"))
    _write(root, d + b"/folder.png/inside.txt", b"x")
    add("folder named like an image", "skip", d + b"/folder.png", None, ["is a folder"])
    add("missing file", "skip", d + b"/missing.png", None, ["does not exist"])
    add("outside the root", "skip", b"../outside.png", None, ["outside the data root"])
    outside = root.parent / f"{root.name}-elsewhere"
    outside.mkdir(exist_ok=True)
    (outside / "img.png").write_bytes(good_png)
    link = Path(os.fsdecode(os.path.join(os.fsencode(root), d + b"/link.png")))
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(outside / "img.png")  # a symlink is the data tree owner's choice
    add("symlink to a file outside the root", "sample", d + b"/link.png", None)
    dangling = Path(os.fsdecode(os.path.join(os.fsencode(root), d + b"/dangling.png")))
    if not dangling.is_symlink():
        dangling.symlink_to(outside / "nothing.png")
    add("dangling symlink", "skip", d + b"/dangling.png", None, ["does not exist"])
    unreadable = _write(root, d + b"/unreadable.png", good_png)
    unreadable.chmod(0)
    if root_is_admin:  # root reads it anyway
        add("unreadable file (read by root)", "sample", d + b"/unreadable.png", None)
    else:
        add("unreadable file", "skip", d + b"/unreadable.png", None, ["cannot read image"])
    add("row with one column", "skip", None, None, ["malformed row"],
        row=d + b"/good0.png")
    add("field over the CSV limit", "skip", None, None, ["malformed row"],
        row=b'"' + b"y" * 200_000 + b'",x')
    add("good last", "sample", d + b"/good6.png", good_png)

    lines = [b"image,mask"] + [c.row for c in cases]
    (root / f"{domain}_test.csv").write_bytes(b"\n".join(lines) + b"\n")
    return cases


def inbox_files(folder, seed: int = 0) -> dict[bytes, str]:
    """Hostile files flat in `folder` (as a camera's inbox would get them): file name
    (bytes) -> what it is. Good images are included so a server has work to do."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    good = png_bytes(image_array(seed))
    trunc = png_bytes(image_array(seed + 1))
    files = {
        b"good.png": (good, "a good image"),
        b"L" * 240 + b".png": (good, "a 244-byte name"),
        b"bad\xff\xfe.png": (trunc[:40], "a non-UTF-8 name on a truncated file"),
        b"new\nline.png": (good, "a newline in the name"),
        b"empty.png": (b"", "a zero-byte file"),
        b"text.png": (b"not an image", "text named like an image"),
        b"huge.png": (huge_png(13000, 13000), "13000 x 13000 in a few KB"),
        b"trunc.jpg": (png_bytes(image_array(seed + 2), fmt="JPEG")[:100], "a truncated JPEG"),
    }
    for name, (data, _) in files.items():
        _write(folder, name, data)
    (Path(os.fsdecode(os.path.join(os.fsencode(folder), b"folder.png")))).mkdir(exist_ok=True)
    out = {name: what for name, (_, what) in files.items()}
    out[b"folder.png"] = "a folder named like an image"
    return out

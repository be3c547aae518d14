"""A data root's domains: the two benchmark layouts, their entries and the stream of
samples (`stream_domain`), crops or whole photographs.

- layouts: the CSV layout of the reference (``<Domain>_train.csv`` then
  ``<Domain>_test.csv``, or one ``<Domain>.csv``; columns ``image,mask``, paths
  relative to the root) and the DoFE layout (``<Domain>/{train,test}/ROIs/{image,mask}``).
  An entry's name is its image path relative to the root (posix), which is unique.
  A CSV row may not leave the root (checked on the path text, so a root reached
  through a symlink works); CSV files win over a DoFE folder of the same domain name.
- samples: each entry is decoded (`grata.decode`: bounded, one-line reasons); a file
  that cannot be listed or read becomes a `Skipped` in its place, never a stop.
- whole photographs (``stream_domain(..., roi=RoiOptions())``): read at their own
  resolution under the same limit, the disc localised (`grata.roi`) and the benchmark's
  ROI cut and read like a crop file (`photo_sample`); the sample keeps the full-size
  truth and the box (``Sample.photo``) so the prediction is scored pasted back; a
  photograph whose disc is not found is skipped with the reason.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from grata import roi as roi_mod
from grata.decode import (
    IMAGE_SUFFIXES,
    load_pair,
    load_photo_pair,
    max_pixels,
    one_line,
    photo_input,
    quote,
    resize_target,
)
from grata.errors import DataError, GrataError

_SPLITS = ("train", "test")


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
    record: dict | None             # grata.roi.record: box, score, centre, radius, FOV;
    #                                 None for a crop read whole (``native``)


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
    # The crop's own target (scored nowhere: metrics use the full-size one) keeps Sample's
    # [2, S, S] contract for callers that look at it.
    small = resize_target(np.stack([roi_mod.crop(t.astype(np.uint8), box) for t in target]),
                          size)
    photo = Photo(tuple(int(v) for v in box), tuple(pixels.shape[:2]), target, pixels,
                  roi_mod.record(info, box))
    return Sample(name, photo_input(crop, size), small.astype(np.float32), Path(image_path or name),
                  photo)


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
        raise GrataError(f"{quote(path)}: cannot read: {e.strerror or one_line(e)}") from None
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
    try:
        header = [c.strip() for c in next(reader, [])]
    except csv.Error as e:
        raise GrataError(f"{quote(path)}: cannot read the header: {one_line(e)}") from None
    rows: list[tuple[int, list[str] | str]] = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # the reader goes on with the next line
            rows.append((reader.line_num, f"malformed row: {one_line(e)}"))
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
        return f"cannot be looked up ({one_line(e)})"


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
                          if p.suffix.lower() in IMAGE_SUFFIXES):
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


def stream_domain(root, domain: str, size: int, splits=_SPLITS, roi: RoiOptions | None = None,
                  native: bool = False) -> Iterator[Sample | Skipped]:
    """Samples of a target domain in streaming order; a file that cannot be listed or
    read becomes a Skipped in its place instead of stopping the stream.

    With ``roi`` every image is a whole photograph: read at its own resolution, its disc
    localised and the benchmark's ROI cut and resized to S (`photo_sample`); the sample
    carries the full-size truth (``sample.photo``). A photograph whose disc is not found
    is a Skipped with the reason.

    With ``native`` every image is a crop read at its own resolution: the sample's input
    is the whole crop resized, and ``sample.photo`` carries the crop's pixels and truth at
    that resolution (box the whole crop, no record) for a locate step that re-crops it
    (`grata.scale_stage`) and scores the prediction pasted back."""
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
            if native:
                pixels, full = load_photo_pair(item.image_path, item.mask_path)
                H, W = pixels.shape[:2]
                yield Sample(item.name, photo_input(pixels, size),
                             resize_target(full, size).astype(np.float32), item.image_path,
                             Photo((0, 0, W, H), (H, W), full, pixels, None))
                continue
            image, target = load_pair(item.image_path, item.mask_path, size)
        except DataError as e:
            yield Skipped(item.name, str(e))
            continue
        except GrataError:  # a setting is wrong (GRATA_MAX_PIXELS): every image would fail
            raise
        except Exception as e:  # noqa: BLE001  (one bad row never stops the stream)
            yield Skipped(item.name, f"{quote(item.image_path)}: cannot read: "
                                     f"{type(e).__name__}: {one_line(e)}")
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

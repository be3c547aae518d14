"""Hostile data: mask conventions, bounded decoding, domain validation, one skipped row per
bad row with a one-line printable reason, and the fault-injection corpus end to end."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hostile import huge_png, image_array, png_bytes, spec_mask, write_corpus
from PIL import Image

from grata import decode, domains, masks
from grata.cli import main
from grata.errors import DataError, GrataError


def _png(path, array, mode=None, fmt=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, fmt, **kw)
    return path


def _reason_ok(text: str) -> None:
    assert text and "\n" not in text and "\r" not in text and text.isprintable(), repr(text)
    assert " object at 0x" not in text, text


# ------------------------------------------------------------------- mask conventions

def test_spec_masks_and_label_maps_read_the_same(tmp_path):
    m = spec_mask(32)
    ref = decode.load_mask(_png(tmp_path / "spec.png", m, "L"), 16)
    assert ref[1].sum() > 0 and ref[0].sum() > ref[1].sum()
    labels = np.select([m == 255, m == 128, m == 0], [0, 1, 2]).astype(np.uint8)
    np.testing.assert_array_equal(decode.load_mask(_png(tmp_path / "lab.png", labels, "L"),
                                                 16), ref)
    assert masks.mask_convention(labels) == "labels" and masks.mask_convention(m) == "spec"
    rim_only = np.where(m == 0, 128, m).astype(np.uint8)  # a disc without cup is spec
    assert masks.mask_convention(rim_only) == "spec"
    assert decode.load_mask(_png(tmp_path / "rim.png", rim_only, "L"), 16)[1].sum() == 0


def test_jpeg_mask_is_read_by_the_nearest_level(tmp_path):
    m = spec_mask(250)  # round edges across the 8x8 blocks: JPEG rings there
    p = _png(tmp_path / "mask.jpg", m, "L", "JPEG", quality=75)
    grey = np.asarray(Image.open(p))
    assert len(np.unique(grey)) > 3  # really noisy
    assert masks.mask_convention(grey) == "spec-noisy"
    got = decode.load_mask(p, 256)
    ref = decode.load_mask(_png(tmp_path / "mask.png", m, "L"), 256)
    for ch in (0, 1):  # same structures up to a few edge pixels
        inter = (got[ch] * ref[ch]).sum()
        union = np.maximum(got[ch], ref[ch]).sum()
        assert inter / union > 0.97


@pytest.mark.parametrize("kind, words", [
    ("zero_one", "one structure only"), ("zero_255", "one structure only"),
    ("white_on_black_jpeg", "one structure only"), ("noise", "no known convention"),
    ("two_rims", "no known convention"), ("no_background", "no background"),
    ("labels_no_background", "no background")])
def test_unknown_or_single_structure_masks_are_refused(tmp_path, kind, words):
    m = spec_mask(64)
    disc = m < 255
    arrays = {
        "zero_one": disc.astype(np.uint8),
        "zero_255": np.where(disc, 255, 0).astype(np.uint8),
        "white_on_black_jpeg": None,
        "noise": np.random.default_rng(0).integers(0, 256, m.shape, dtype=np.uint8),
        "two_rims": np.where(m == 128, np.where(np.arange(64) % 2, 60, 190), m).astype(
            np.uint8),
        "no_background": np.where(m == 255, 128, m).astype(np.uint8),
        "labels_no_background": np.where(disc, 2, 1).astype(np.uint8),
    }
    if kind == "white_on_black_jpeg":
        p = _png(tmp_path / "m.jpg", np.kron(arrays["zero_255"], np.ones((4, 4), np.uint8)),
                 "L", "JPEG", quality=80)
    else:
        p = _png(tmp_path / "m.png", arrays[kind], "L")
    with pytest.raises(DataError) as e:
        decode.load_mask(p, 16)
    _reason_ok(str(e.value))
    assert words in str(e.value) and p.name in str(e.value)


# ------------------------------------------------------------------- bounded decoding

_RSS = """
import resource, sys
from grata import decode
from grata.errors import DataError
decode.load_image(sys.argv[2], 8)  # warm up: imports, decoders
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode.load_{what}(sys.argv[1], 128)
    print("loaded")
except DataError as e:
    print("refused", str(e))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.parametrize("what", ["image", "mask"])
def test_huge_dimensions_in_a_tiny_file_are_refused_from_the_header(tmp_path, what):
    huge = tmp_path / "huge.png"
    huge.write_bytes(huge_png(13000, 13000))
    assert huge.stat().st_size < 100_000
    small = _png(tmp_path / "small.png", image_array(0))
    env = {k: v for k, v in os.environ.items() if k != "GRATA_MAX_PIXELS"}
    out = subprocess.run([sys.executable, "-c", _RSS.format(what=what), str(huge),
                          str(small)], capture_output=True, text=True, check=True,
                         env=env).stdout.splitlines()
    assert out[0].startswith("refused") and "13000x13000" in out[0], out
    assert "decoding limit of 40 MP" in out[0]
    grown_kb = int(out[1])
    # a full decode is 169 MB as grey, 507 MB as RGB; the header check needs next to nothing
    assert grown_kb < 20_000, f"peak RSS grew by {grown_kb} KB"


def test_a_20000_pixel_photograph_is_refused_with_the_limits_line(tmp_path, monkeypatch):
    # Above twice Pillow's own bound (179 MP) Pillow refuses it at open, before our check
    huge = tmp_path / "huge.png"
    huge.write_bytes(huge_png(20000, 20000))
    monkeypatch.delenv("GRATA_MAX_PIXELS", raising=False)
    for load in (lambda: decode.load_image(huge, 64), lambda: decode.load_photo(huge)):
        with pytest.raises(DataError) as info:
            load()
        assert str(info.value).endswith("huge.png': image is 400 MP, above the decoding "
                                        "limit of 40 MP (GRATA_MAX_PIXELS)")
    monkeypatch.setenv("GRATA_MAX_PIXELS", "500000000")  # ours above Pillow's: say whose
    with pytest.raises(DataError, match=r"400 MP, above the image library's own bound of "
                                        r"179 MP, which GRATA_MAX_PIXELS does not lift$"):
        decode.load_image(huge, 64)


def test_pixel_limit_is_configurable_and_jpeg_decodes_reduced(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8),
                     np.ones((80, 80, 1), np.uint8))  # 2400 x 2400
    jpg = _png(tmp_path / "big.jpg", smooth, fmt="JPEG", quality=95)
    png = _png(tmp_path / "big.png", smooth)
    mask = _png(tmp_path / "mask.png", np.kron(spec_mask(30), np.ones((80, 80), np.uint8)),
                "L")
    full = decode.load_image(jpg, 64)  # 5.8 MP: under the default limit, decoded in full
    reduced = decode.load_image(jpg, 64, limit=2_000_000)  # decoded at 1/2: 1.44 MP
    assert np.abs(reduced - full).mean() < 0.01 and 0 < np.abs(reduced - full).max()
    with pytest.raises(DataError, match="mask.png.*above the decoding limit"):
        decode.load_pair(jpg, mask, 64, limit=2_000_000)  # masks are never reduced
    with pytest.raises(DataError, match="above the decoding limit of 2 MP"):
        decode.load_image(png, 64, limit=2_000_000)  # only JPEG decodes reduced
    with pytest.raises(DataError, match="above the decoding limit"):
        decode.load_image(jpg, 64, limit=50_000)  # even 1/8 (300 x 300) is above
    monkeypatch.setenv("GRATA_MAX_PIXELS", "1e6")
    assert decode.max_pixels() == 1_000_000
    with pytest.raises(DataError, match="limit of 1 MP"):
        decode.load_image(png, 64)
    monkeypatch.setenv("GRATA_MAX_PIXELS", "lots")
    with pytest.raises(GrataError, match="GRATA_MAX_PIXELS"):
        decode.max_pixels()
    root = tmp_path / "data"
    _domain(root, "D")
    with pytest.raises(GrataError, match="GRATA_MAX_PIXELS"):  # a setting stops the run,
        domains.validate_domains(root, ["D"])
    with pytest.raises(GrataError, match="GRATA_MAX_PIXELS"):  # not one skip per image
        list(domains.stream_domain(root, "D", 8))


# ------------------------------------------------------------------- reasons

def test_reasons_never_echo_object_reprs_and_quote_names(tmp_path):
    with pytest.raises(DataError) as e:
        decode.load_image(io.BytesIO(b"junk, not an image"), 8)
    _reason_ok(str(e.value))
    assert "not an image format" in str(e.value) and "BytesIO" in str(e.value)
    with pytest.raises(DataError) as e:
        decode.load_image(io.BytesIO(png_bytes(image_array(0))[:60]), 8)
    _reason_ok(str(e.value))
    p = tmp_path / "two\nlines\r.png"
    p.write_bytes(b"text")
    with pytest.raises(DataError) as e:
        decode.load_image(p, 8)
    _reason_ok(str(e.value))
    assert "two\\nlines\\r.png" in str(e.value)
    assert decode.quote(os.fsdecode(b"caf\xe9.png")) == "'caf\\udce9.png'"
    assert decode.quote(io.BytesIO()) == "<BytesIO>"


# ------------------------------------------------------------------- domains

def _domain(root, name, n=2, header="image,mask"):
    rows = []
    for i in range(n):
        img = _png(root / name / f"i{i}.png", image_array(i))
        msk = _png(root / name / f"m{i}.png", spec_mask(), "L")
        rows.append(f"{img.relative_to(root)},{msk.relative_to(root)}")
    (root / f"{name}_test.csv").write_text("\n".join([header, *rows]) + "\n")


def test_every_domain_is_validated_before_the_first_image(tmp_path, capsys, monkeypatch):
    root = tmp_path / "data"
    _domain(root, "Src")
    _domain(root, "Good")
    _domain(root, "Late", header="picture,label")
    with pytest.raises(GrataError) as e:
        domains.validate_domains(root, ["Good", "Late"])
    _reason_ok(str(e.value))
    assert "Late_test.csv" in str(e.value) and "image,mask" in str(e.value)
    domains.validate_domains(root, ["Good"])
    with pytest.raises(GrataError, match="Late_test.csv"):
        domains.resolve_targets(root, "Src", None)

    import grata.adapt

    def no_run(*a, **k):
        raise AssertionError("images were streamed before the domains were validated")
    monkeypatch.setattr(grata.adapt, "run", no_run)
    rc = main(["adapt", "--data", str(root), "--source", "Src", "--targets", "Good,Late",
               "--backend", "torch", "--quiet", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Late_test.csv" in err, err
    assert not (tmp_path / "run" / "report.json").exists()


def test_undecodable_rows_are_skipped_rows(tmp_path):
    root = tmp_path / "data"
    _domain(root, "D", n=3)
    csv_path = root / "D_test.csv"
    lines = csv_path.read_bytes().split(b"\n")
    lines.insert(2, b"D/caf\xe9.png,D/m0.png")         # not UTF-8
    lines.insert(3, b'"' + b"z" * 200_000 + b'",D/m0.png')  # over the csv field limit
    lines.insert(4, b'D/i1.png,"D/m1.png')  # an unterminated quote swallows the rest
    csv_path.write_bytes(b"\n".join(lines))
    out = list(domains.stream_domain(root, "D", 8))
    kinds = [type(o).__name__ for o in out]
    assert kinds[:3] == ["Sample", "Skipped", "Skipped"], kinds
    assert "not UTF-8" in out[1].reason and "malformed row" in out[2].reason
    for o in out:
        if isinstance(o, domains.Skipped):
            _reason_ok(o.reason)


def test_an_unexpected_decoder_failure_is_a_skipped_row(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _domain(root, "D", n=2)
    real = decode._image_array

    def boom(img, size, path):
        if "i0.png" in path:
            raise ZeroDivisionError("decoder bug")
        return real(img, size, path)
    monkeypatch.setattr(decode, "_image_array", boom)
    out = list(domains.stream_domain(root, "D", 8))
    assert [type(o).__name__ for o in out] == ["Skipped", "Sample"]
    assert "ZeroDivisionError" in out[0].reason
    _reason_ok(out[0].reason)


# ------------------------------------------------------------------- the corpus

def test_hostile_corpus_each_row_ends_as_one_sample_or_one_skip(tmp_path):
    root = tmp_path / "data"
    cases = write_corpus(root)
    assert len(cases) >= 20
    out = list(domains.stream_domain(root, "Hostile", 16))
    assert len(out) == len(cases), [type(o).__name__ for o in out]
    for case, item in zip(cases, out):
        if case.expect == "sample":
            assert isinstance(item, domains.Sample), (case.name, getattr(item, "reason", ""))
            assert item.image.shape == (3, 16, 16) and np.isfinite(item.image).all()
            continue
        assert isinstance(item, domains.Skipped), case.name
        _reason_ok(item.reason)
        for w in case.words:
            assert w in item.reason, (case.name, item.reason)
    # the reasons survive the report's JSON and a UTF-8 log unchanged
    reasons = [o.reason for o in out if isinstance(o, domains.Skipped)]
    assert json.loads(json.dumps(reasons)) == reasons
    "\n".join(reasons).encode("utf-8")

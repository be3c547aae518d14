"""Readers and layouts (grata.decode, grata.domains, grata.masks), on tiny hand-made files."""

import ast
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from grata import decode, domains, masks
from grata.errors import DataError, GrataError


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path)
    return path


def _rgb(h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(20, 200, (h, w, 3), dtype=np.uint8)


def _mask(h=8, w=8):
    m = np.full((h, w), 255, np.uint8)
    m[2:6, 2:6] = 128
    m[3:5, 3:5] = 0
    return m


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------------- images

def test_image_min_max_scaling(tmp_path):
    a = np.zeros((4, 4, 3), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 50, 100, 150
    a[0, 0] = (50, 60, 250)
    x = decode.load_image(_png(tmp_path / "a.png", a), 4)
    assert x.shape == (3, 4, 4) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    # min-max over all channels and pixels together, not per channel
    np.testing.assert_allclose(x[:, 1, 1], [0.0, 0.25, 0.5], atol=1e-6)
    assert x[2, 0, 0] == 1.0


def test_constant_image_gives_zeros(tmp_path):
    x = decode.load_image(_png(tmp_path / "c.png", np.full((5, 5, 3), 77, np.uint8)), 3)
    assert np.isfinite(x).all() and not x.any()


def test_bilinear_resize_of_image(tmp_path):
    a = np.zeros((2, 2, 3), np.uint8)
    a[:, 1] = 255
    x = decode.load_image(_png(tmp_path / "a.png", a), 4)
    # bilinear gives intermediate values between the two columns
    assert 0 < x[0, 0, 1] < 1 and x[0, 0, 0] == 0 and x[0, 0, 3] == 1


def test_grey_rgba_palette_and_jpeg_images(tmp_path):
    g = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    x = decode.load_image(_png(tmp_path / "g.png", g, "L"), 4)
    assert x.shape == (3, 4, 4)
    np.testing.assert_array_equal(x[0], x[1])
    np.testing.assert_array_equal(x[0], x[2])
    np.testing.assert_allclose(x[0], (g - g.min()) / (g.max() - g.min()), atol=1e-6)

    rgba = np.dstack([_rgb(4, 4), np.zeros((4, 4), np.uint8)])  # transparent: alpha dropped
    x = decode.load_image(_png(tmp_path / "rgba.png", rgba, "RGBA"), 4)
    ref = decode.load_image(_png(tmp_path / "rgb.png", rgba[..., :3]), 4)
    np.testing.assert_array_equal(x, ref)

    Image.fromarray(_rgb(6, 6)).convert("P").save(tmp_path / "p.png")
    x = decode.load_image(tmp_path / "p.png", 6)
    assert x.shape == (3, 6, 6) and x.min() == 0 and x.max() == 1

    Image.fromarray(_rgb(16, 16)).save(tmp_path / "j.jpg", quality=90)
    x = decode.load_image(tmp_path / "j.jpg", 8)
    assert x.shape == (3, 8, 8) and x.min() == 0 and x.max() == 1


def test_16bit_grey_image_is_not_clipped(tmp_path):
    v = np.array([[0, 1000], [30000, 60000]], np.uint16)
    Image.fromarray(v).save(tmp_path / "w.png")
    assert Image.open(tmp_path / "w.png").mode.startswith("I")
    x = decode.load_image(tmp_path / "w.png", 2)
    # clipping at 255 would make 30000 and 60000 equal
    np.testing.assert_allclose(x[0], v / 60000.0, atol=1e-6)


# ------------------------------------------------------------------------- masks

def test_mask_channel_mapping(tmp_path):
    m = np.array([[255, 100, 100, 255, 0]], np.uint8)  # one rim level: any value between
    t = decode.load_mask(_png(tmp_path / "m.png", m, "L"), 5)
    assert t.shape == (2, 5, 5) and t.dtype == np.float32
    np.testing.assert_array_equal(t[0, 0], [0, 1, 1, 0, 1])  # disc incl. cup: < 255
    np.testing.assert_array_equal(t[1, 0], [0, 0, 0, 0, 1])  # cup: == 0
    m = np.array([[255, 128, 1, 254, 0]], np.uint8)  # several levels: nearest of 0/128/255
    t = decode.load_mask(_png(tmp_path / "n.png", m, "L"), 5)
    np.testing.assert_array_equal(t[0, 0], [0, 1, 1, 0, 1])
    np.testing.assert_array_equal(t[1, 0], [0, 0, 1, 0, 1])


def test_rgb_mask_read_as_grey(tmp_path):
    m = _mask()
    t = decode.load_mask(_png(tmp_path / "rgb.png", np.dstack([m, m, m])), 8)
    ref = decode.load_mask(_png(tmp_path / "l.png", m, "L"), 8)
    np.testing.assert_array_equal(t, ref)
    assert t[1].sum() == 4 and t[0].sum() == 16


def test_mask_nearest_resize_keeps_binary(tmp_path):
    t = decode.load_mask(_png(tmp_path / "m.png", _mask()), 13)
    assert set(np.unique(t)) == {0.0, 1.0}
    assert (t[1] <= t[0]).all()  # cup stays inside disc


def test_16bit_masks(tmp_path):
    m8 = _mask()
    Image.fromarray(m8.astype(np.uint16)).save(tmp_path / "small.png")
    ref = decode.load_mask(_png(tmp_path / "l.png", m8, "L"), 8)
    np.testing.assert_array_equal(decode.load_mask(tmp_path / "small.png", 8), ref)
    full = np.where(m8 == 255, 65535, np.where(m8 == 128, 32896, 0)).astype(np.uint16)
    Image.fromarray(full).save(tmp_path / "full.png")
    np.testing.assert_array_equal(decode.load_mask(tmp_path / "full.png", 8), ref)
    odd = (m8.astype(np.uint16) * 100)
    Image.fromarray(odd).save(tmp_path / "odd.png")
    with pytest.raises(DataError) as e:
        decode.load_mask(tmp_path / "odd.png", 8)
    assert "odd.png" in _one_line(e) and "16-bit" in str(e.value)


def test_to_mask_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    disc = rng.random((7, 7)) < 0.6
    pred = np.stack([disc, disc & (rng.random((7, 7)) < 0.5)])
    png = masks.to_mask_png(pred)
    assert png.dtype == np.uint8 and set(np.unique(png)) == {0, 128, 255}
    Image.fromarray(png).save(tmp_path / "p.png")
    np.testing.assert_array_equal(decode.load_mask(tmp_path / "p.png", 7), pred)
    # probabilities are thresholded at 0.5; a cup outside the disc is still cup
    probs = np.zeros((2, 1, 3))
    probs[0, 0] = [0.2, 0.7, 0.2]
    probs[1, 0] = [0.1, 0.9, 0.6]
    np.testing.assert_array_equal(masks.to_mask_png(probs)[0], [255, 0, 0])


# ------------------------------------------------------------------------- bad files

def test_unreadable_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(DataError) as e:
        decode.load_image(bad, 4)
    msg = _one_line(e)
    assert "bad.png" in msg and "cannot read image" in msg


def test_truncated_png(tmp_path):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    p = _png(tmp_path / "t.png", np.random.default_rng(1).integers(0, 255, (64, 64, 3),
                                                                   dtype=np.uint8))
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(DataError) as e:
        decode.load_image(p, 8)
    assert "t.png" in _one_line(e) and "cannot read image" in str(e.value)


def test_mask_of_another_size(tmp_path):
    img = _png(tmp_path / "i.png", _rgb(8, 8))
    mask = _png(tmp_path / "m.png", _mask(8, 10))
    with pytest.raises(DataError) as e:
        decode.load_pair(img, mask, 4)
    msg = _one_line(e)
    assert "m.png" in msg and "10x8" in msg and "8x8" in msg


# ------------------------------------------------------------------------- layouts

def _csv(path, rows):
    path.write_text("image,mask\n" + "".join(f"{a},{b}\n" for a, b in rows))


def _csv_root(tmp_path):
    root = tmp_path / "bench"
    for split, n in (("train", 3), ("test", 2)):
        rows = []
        for i in range(n):
            rel = f"DomA/{split}/img_{i}.png", f"DomA/{split}/mask_{i}.png"
            _png(root / rel[0], _rgb(seed=i))
            _png(root / rel[1], _mask())
            rows.append(rel)
        # streaming order is file order, not name order
        _csv(root / f"DomA_{split}.csv", rows[::-1])
    _png(root / "Valid/x.png", _rgb())
    _png(root / "Valid/y.png", _mask())
    _csv(root / "REFUGE_Valid.csv", [("Valid/x.png", "Valid/y.png")])
    (root / "results.csv").write_text("domain,dice\nA,1\n")  # not a domain
    return root


def test_csv_layout_order(tmp_path):
    root = _csv_root(tmp_path)
    assert domains.list_domains(root) == ["DomA", "REFUGE_Valid"]
    entries, problems = domains.domain_entries(root, "DomA")
    assert problems == []
    assert [e.name for e in entries] == [
        "DomA/train/img_2.png", "DomA/train/img_1.png", "DomA/train/img_0.png",
        "DomA/test/img_1.png", "DomA/test/img_0.png"]
    assert entries[0].mask_path == root / "DomA/train/mask_2.png"
    samples = list(domains.stream_domain(root, "DomA", 6))
    assert all(isinstance(s, domains.Sample) for s in samples) and len(samples) == 5
    assert samples[0].image.shape == (3, 6, 6) and samples[0].target.shape == (2, 6, 6)
    (entry,), _ = domains.domain_entries(root, "REFUGE_Valid")
    assert entry.image_path == root / "Valid/x.png"


def test_dofe_layout(tmp_path):
    root = tmp_path / "dofe"
    for split, names in (("train", ["b.png", "a.png"]), ("test", ["c.png"])):
        for n in names:
            _png(root / "Domain1" / split / "ROIs/image" / n, _rgb())
            _png(root / "Domain1" / split / "ROIs/mask" / n, _mask())
    _png(root / "Domain1/test/ROIs/image/nomask.png", _rgb())
    assert domains.list_domains(root) == ["Domain1"]
    entries, problems = domains.domain_entries(root, "Domain1")
    assert [e.name for e in entries] == ["Domain1/train/ROIs/image/a.png",
                                         "Domain1/train/ROIs/image/b.png",
                                         "Domain1/test/ROIs/image/c.png"]
    assert len(problems) == 1 and "nomask.png" in problems[0][1]


def test_csv_rows_outside_root_missing_or_malformed(tmp_path):
    root = _csv_root(tmp_path)
    _png(tmp_path / "outside.png", _rgb())
    _csv(root / "DomA_test.csv", [
        ("../outside.png", "DomA/test/mask_0.png"),
        (str(tmp_path / "outside.png"), "DomA/test/mask_0.png"),
        ("DomA/test/missing.png", "DomA/test/mask_0.png"),
        ("DomA/test/img_0.png", ""),
        ("DomA/test/img_1.png", "DomA/test/mask_1.png"),
    ])
    entries, problems = domains.domain_entries(root, "DomA")
    assert [e.name for e in entries][-1] == "DomA/test/img_1.png" and len(entries) == 4
    reasons = [r for _, r in problems]
    assert len(reasons) == 4
    assert "outside the data root" in reasons[0] and "../outside.png" in reasons[0]
    assert "outside the data root" in reasons[1]
    assert "missing.png" in reasons[2] and "does not exist" in reasons[2]
    assert "malformed row" in reasons[3] and "DomA_test.csv:5" in problems[3][0]


def test_stream_skips_bad_entries_and_keeps_good_ones(tmp_path):
    root = _csv_root(tmp_path)
    (root / "DomA/train/img_1.png").write_bytes(b"garbage")
    _png(root / "DomA/train/mask_0.png", _mask(9, 9))
    p = root / "DomA/test/img_0.png"
    p.write_bytes(p.read_bytes()[:40])
    _csv(root / "DomA_test.csv", [("DomA/test/img_0.png", "DomA/test/mask_0.png"),
                                  ("DomA/test/img_1.png", "DomA/test/mask_1.png"),
                                  ("../x.png", "DomA/test/mask_1.png")])
    out = list(domains.stream_domain(root, "DomA", 4))
    kinds = [type(o).__name__ for o in out]
    assert kinds == ["Sample", "Skipped", "Skipped", "Skipped", "Sample", "Skipped"]
    assert "img_1.png" in out[1].reason and "cannot read image" in out[1].reason
    assert "mask_0.png" in out[2].reason and "9x9" in out[2].reason
    assert "img_0.png" in out[3].reason
    assert "outside the data root" in out[5].reason


def test_empty_unknown_domain_and_missing_root(tmp_path):
    root = _csv_root(tmp_path)
    with pytest.raises(GrataError) as e:
        domains.domain_entries(root, "Nope")
    msg = _one_line(e)
    assert "Nope" in msg and "DomA" in msg and "REFUGE_Valid" in msg

    (root / "Empty_train.csv").write_text("image,mask\nEmpty/a.png,Empty/b.png\n")
    with pytest.raises(GrataError) as e:
        list(domains.stream_domain(root, "Empty", 4))
    msg = _one_line(e)
    assert "Empty" in msg and "no usable images" in msg and "a.png" in msg and "DomA" in msg

    with pytest.raises(GrataError) as e:
        domains.list_domains(tmp_path / "nowhere")
    assert "nowhere" in _one_line(e) and "does not exist" in str(e.value)


# --------------------------------------------------------------------- image suffixes
# Modules being rewritten in parallel that still keep a list of their own (issue 20):
# each entry goes once the module reads grata.decode.IMAGE_SUFFIXES.
PENDING_SUFFIX_LISTS: set[str] = set()


def test_image_suffixes_are_listed_once(tmp_path):
    root = Path(__file__).resolve().parents[1]
    found = set()
    for folder in ("grata", "export", "runtime", "kernels", "calibration"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                    words = {e.value.lower() for e in node.elts
                             if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                    if {".png", ".jpg"} <= words:
                        found.add(path.relative_to(root).as_posix())
    assert found == {"grata/decode.py"} | PENDING_SUFFIX_LISTS
    # and the DoFE listing reads exactly those files
    rois = tmp_path / "D" / "test" / "ROIs"
    (rois / "image").mkdir(parents=True)
    for k, suffix in enumerate((*decode.IMAGE_SUFFIXES, ".PNG", ".gif", ".txt")):
        Image.fromarray(_rgb()).save(rois / "image" / f"i{k}{suffix}", "PNG")
        _png(rois / "mask" / f"i{k}.png", _mask())
    entries, _ = domains.domain_entries(tmp_path, "D")
    assert sorted(Path(e.name).suffix for e in entries) == sorted(
        (*decode.IMAGE_SUFFIXES, ".PNG"))

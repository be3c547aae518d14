"""The model's disc scale: measured from masks of known geometry (hand-computed), kept
beside the checkpoint and read back, malformed files refused in one line."""

import json
import math

import numpy as np
import pytest

from grata import disc_scale
from grata.disc_scale import DiscScale, measure_disc_scale, model_scale
from grata.errors import GrataError


def _disc(h, w, cx, cy, r):
    """A filled circle of radius r (pixel centres within r of (cx, cy))."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def test_geometry_of_a_known_disc():
    # a rectangle: rows 10..29 (20 rows), columns 40..49: centre (45, 20), diameter 20
    m = np.zeros((100, 80), bool)
    m[10:30, 40:50] = True
    assert disc_scale.disc_geometry(m) == (45.0, 20.0, 20.0)
    assert disc_scale.disc_geometry(np.zeros((5, 5))) is None
    # a circle of radius 15.5 centred on a pixel corner: in the middle columns (0.5 from
    # the centre) the pixel centres 0.5 .. 14.5 above and below lie within sqrt(15.5^2 -
    # 0.5^2) = 15.49, the next (15.5) does not: 30 rows
    cx, cy, d = disc_scale.disc_geometry(_disc(64, 64, 32, 32, 15.5))
    assert (cx, cy, d) == (32.0, 32.0, 30.0)


def test_measure_from_hand_built_masks():
    # five 100x100 masks with vertical diameters 20, 30, 40, 50, 60 px (rectangles 10
    # wide), centres 0, 10, 0, 10, 0 px right of the crop centre (50, 50)
    masks = []
    for i, h in enumerate((20, 30, 40, 50, 60)):
        m = np.zeros((100, 100), np.uint8)
        x0 = 45 + (10 if i % 2 else 0)
        m[50 - h // 2:50 + h // 2, x0:x0 + 10] = 1
        masks.append(m)
    masks.append(np.zeros((100, 100)))  # no disc: left out
    s = measure_disc_scale(masks)
    assert s.n == 5
    assert s.diameter == pytest.approx(0.40)
    assert s.low == pytest.approx(np.percentile([0.2, 0.3, 0.4, 0.5, 0.6], 10))  # 0.24
    assert s.high == pytest.approx(0.56)
    assert s.offset == pytest.approx(0.0) and s.offset_high == pytest.approx(0.1)


def test_measure_takes_two_channel_targets_at_any_resolution():
    t = np.zeros((3, 2, 64, 64), np.float32)
    for k, r in enumerate((8, 10, 12)):
        t[k, 0] = _disc(64, 64, 32, 32, r)  # vertical diameters 16, 20, 24 px
    s = measure_disc_scale(t)
    assert s.diameter == pytest.approx(20 / 64) and s.n == 3
    assert s.offset == pytest.approx(0.0)


def test_no_disc_anywhere_is_one_line():
    with pytest.raises(GrataError, match="no disc"):
        measure_disc_scale([np.zeros((8, 8))])


def test_sidecar_round_trip(tmp_path):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")
    assert disc_scale.read_sidecar(ckpt) is None
    s = DiscScale(0.344, 0.297, 0.406, 0.064, 0.106, 80)
    path = disc_scale.write_sidecar(ckpt, s, {"domain": "Clinic", "size": 128})
    assert path == tmp_path / "model.pt.scale.json"
    body = json.loads(path.read_text())
    assert body["measured_on"] == {"domain": "Clinic", "size": 128}
    assert disc_scale.read_sidecar(ckpt) == s


@pytest.mark.parametrize("text,match", [
    ("not json", "not a readable"),
    ('{"format": "other"}', "not a grata-disc-scale"),
    ('{"format": "grata-disc-scale", "format_version": 1, "disc_scale": {"diameter": 0.3}}',
     "should be a finite number"),
    ('{"format": "grata-disc-scale", "format_version": 1, "disc_scale": {"diameter": 0.3, '
     '"low": 0.5, "high": 0.6, "offset": 0, "offset_high": 0.1, "n": 3}}', "implausible"),
])
def test_a_broken_sidecar_is_refused_not_ignored(tmp_path, text, match):
    ckpt = tmp_path / "m.pt"
    disc_scale.sidecar_path(ckpt).write_text(text)
    with pytest.raises(GrataError, match=match):
        disc_scale.read_sidecar(ckpt)


def test_model_scale_order_and_messages(tmp_path):
    ckpt = tmp_path / "m.pt"
    measured = DiscScale(0.3, 0.25, 0.35, 0.05, 0.1, 10)
    disc_scale.write_sidecar(ckpt, measured)
    other = DiscScale(0.4, 0.3, 0.5, 0.05, 0.1, 20)
    # the flag wins, then the manifest, then the sidecar
    s, line = model_scale({"disc_scale": other.to_json()}, ckpt, 0.2)
    assert s.diameter == 0.2 and s.n == 0 and "--disc-scale" in line
    assert s.low == pytest.approx(0.2 * (1 - disc_scale.GIVEN_SPREAD))
    s, line = model_scale({"disc_scale": other.to_json()}, ckpt)
    assert s == other and "manifest" in line
    s, line = model_scale({"arch": "edge"}, ckpt)  # an artifact exported before the field
    assert s == measured and "m.pt.scale.json" in line
    s, line = model_scale({"arch": "edge"}, tmp_path / "none.pt")
    assert s is None and "unknown" in line and "\n" not in line


@pytest.mark.parametrize("bad", [0, -0.3, 3.0, float("nan")])
def test_a_bad_flag_value_is_one_line(bad):
    with pytest.raises(GrataError, match="--disc-scale"):
        DiscScale.given(bad)


def test_area_fraction_conversion_in_the_help():
    # the help's example: an area fraction of 0.10 is a diameter of 0.36
    assert math.sqrt(4 * 0.10 / math.pi) == pytest.approx(0.357, abs=1e-3)
    assert "d = sqrt(4a/pi)" in disc_scale.DIAMETER_HELP and "d = 0.36" in disc_scale.DIAMETER_HELP


def test_shipped_checkpoint_has_its_scale():
    from grata import defaults
    s = defaults.disc_scale()
    assert s is not None and s.n == 80  # the Clinic train split
    assert 0.3 < s.diameter < 0.4 and s.low < s.diameter < s.high

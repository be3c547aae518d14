"""The per-image pipeline: its paste-back step against PIL and a hand-made paste, its
engine steps against the method's own step, and the locate seam (a locator of the
test's own places the picture, and is reset with the stream)."""

import io

import numpy as np
import pytest
from PIL import Image

from grata.masks import to_mask_png
from grata.engine_chooser import open_engine
from grata.errors import DataError
from grata.methods import create
from grata.picture import PictureReader
from grata.pipeline import ImagePipeline
from grata.placement import Placement

SIZE = 64


def test_whole_picture_paste_is_the_mask_resized():
    rng = np.random.default_rng(0)
    pred = rng.random((2, 8, 8)) > 0.5
    full = Placement.whole((13, 21)).paste(pred)
    for c in range(2):
        want = np.asarray(Image.fromarray(pred[c].astype(np.uint8)).resize((21, 13),
                                                                           Image.NEAREST))
        np.testing.assert_array_equal(full[c], want > 0)
    # the serve record's mask: the same as the model-size mask resized
    np.testing.assert_array_equal(to_mask_png(full), np.asarray(
        Image.fromarray(to_mask_png(pred)).resize((21, 13), Image.NEAREST)))
    assert Placement.whole((13, 21)).fields() == {}


def test_paste_into_a_box_that_leaves_the_picture():
    pred = np.zeros((2, 4, 4), bool)
    pred[0, 1:3, 0:2] = True
    pred[1, 0, 3] = True
    # the box is 8x8 (twice the prediction) and starts 2 pixels left of the picture
    placement = Placement((6, 5), (-2, 1, 6, 9), {"box": [-2, 1, 6, 9]})
    full = placement.paste(pred)
    want = np.zeros((2, 6, 5), bool)
    big = np.kron(pred, np.ones((1, 2, 2), bool))  # nearest, scale 2
    want[:, 1:6, 0:5] = big[:, 0:5, 2:7]
    np.testing.assert_array_equal(full, want)
    assert placement.located and placement.fields() == {"roi": {"box": [-2, 1, 6, 9]}}
    with pytest.raises(ValueError, match=r"\[2, S, S\]"):
        placement.paste(np.zeros((3, 4, 4)))


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((3, SIZE, SIZE), dtype=np.float32) for _ in range(n)]


@pytest.mark.parametrize("spec,norm", [("grata", "sample"), ("tent", "ema:0.3")])
def test_a_step_is_the_methods_own_step(edge64, spec, norm):
    """adapt -> predict -> stream through the pipeline gives the method's adapt, bit for
    bit: logits, theta and stream statistics, image after image."""
    art = edge64[1]
    ref = create(spec, open_engine(art, threads=1), norm=norm, seed=1)
    pipeline = ImagePipeline(create(spec, open_engine(art, threads=1), norm=norm, seed=1),
                             keep_served_stats=True)
    e = pipeline.engine
    for img in _images(3):
        before = None if e.stats is None else e.stats.copy()
        want = ref.adapt(ref.engine.to_input(img), image=img)
        out = pipeline.step(e.to_input(img), img)
        np.testing.assert_array_equal(out.logits, want)
        np.testing.assert_array_equal(e.theta, ref.engine.theta)
        if norm.startswith("ema"):  # served at the estimate before this image
            np.testing.assert_array_equal(pipeline.served_stats, before)
            np.testing.assert_array_equal(e.stats, ref.engine.stats)
        assert out.decision is None and set(out.timings) == {"adapt", "predict"}


class CentreCrop:
    """A locator of the test's own: the central SIZE x SIZE box, scaled to [0, 1]."""

    def __init__(self):
        self.resets = 0

    def locate(self, picture, name):
        H, W = picture.shape[:2]
        x0, y0 = (W - SIZE) // 2, (H - SIZE) // 2
        crop = picture[y0:y0 + SIZE, x0:x0 + SIZE].astype(np.float32).transpose(2, 0, 1)
        crop = (crop - crop.min()) / (crop.max() - crop.min())
        box = (x0, y0, x0 + SIZE, y0 + SIZE)
        return crop, Placement((H, W), box, {"box": list(box), "how": "centre"}, picture)

    def reset(self):
        self.resets += 1


def test_a_locator_places_the_picture_and_is_reset_with_the_stream(edge64):
    rng = np.random.default_rng(2)
    pixels = (rng.random((80, 96, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    locator = CentreCrop()
    pipeline = ImagePipeline(create("bn", open_engine(edge64[1], threads=1)),
                             reader=PictureReader(SIZE, locator))
    picture = pipeline.load(buf.getvalue(), "eye.png")
    assert picture.name == "eye.png" and picture.placement.box == (16, 8, 80, 72)
    assert picture.placement.fields() == {"roi": {"box": [16, 8, 80, 72], "how": "centre"}}
    out = pipeline.process(picture)
    assert out.full.shape == (2, 80, 96) and not out.full[:, :8].any()
    np.testing.assert_array_equal(out.full[:, 8:72, 16:80], out.pred)
    pipeline.reset()
    assert locator.resets == 1


def test_load_names_what_it_cannot_use(edge64):
    pipeline = ImagePipeline(create("source", open_engine(edge64[1], threads=1)),
                             reader=PictureReader(SIZE))
    with pytest.raises(DataError, match=r"^cam: expected a \[3, 64, 64\] image"):
        pipeline.load(np.zeros((3, 32, 32), np.float32), "cam")
    with pytest.raises(DataError, match="^junk.png: "):
        pipeline.load(b"not an image", "junk.png")
    picture = pipeline.load(np.full((3, SIZE, SIZE), 0.5, np.float32))
    assert picture.name == "array" and picture.placement == Placement.whole((SIZE, SIZE))

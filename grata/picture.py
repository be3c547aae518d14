"""The load and locate steps of the per-image pipeline (`grata.pipeline`): an image as
given -> a `Picture` (the model's input and where it sits in the picture).

`PictureReader.load` takes a file path, the file's bytes or a model input; a file is
decoded at the model's size (a crop) or, with a locator (`grata.placement.Locator`:
`grata.photo.RoiLocator` for whole photographs), read whole and placed. `picture_of`
takes a sample of `grata.domains.stream_domain` (a whole photograph's sample comes placed by
the reader's ROI options).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from grata.decode import load_image, load_photo
from grata.domains import Sample
from grata.errors import DataError
from grata.photo import placement_of
from grata.placement import Locator, Placement
from grata.roi import RoiRejected



@dataclass
class Picture:
    """An image ready for the engine: its name, the model's input (float32 [3, S, S] in
    [0, 1]) and where that input sits in the picture as given."""

    name: str
    image: np.ndarray
    placement: Placement


class PictureReader:
    """The load step at the model's input side `size`, with the locate step of `locator`
    (None: every image is a crop, the whole picture resized)."""

    def __init__(self, size: int, locator: Locator | None = None):
        self.size, self.locator = size, locator

    def reset(self) -> None:
        """A new stream: the locator forgets any running estimate."""
        if self.locator is not None:
            self.locator.reset()

    def load(self, image, name: str | None = None) -> Picture:
        """A file path, the file's bytes or a model input [3, S, S] in [0, 1] -> Picture.
        An unusable image is a DataError naming it."""
        S = self.size
        if isinstance(image, np.ndarray):
            img = np.ascontiguousarray(image, dtype=np.float32)
            if img.shape != (3, S, S):
                raise DataError(name or "array", f"expected a [3, {S}, {S}] image, got "
                                                  f"{list(img.shape)}")
            if not np.isfinite(img).all():
                raise DataError(name or "array", "image has non-finite values")
            return Picture(name or "array", img, Placement.whole((S, S)))
        if isinstance(image, (bytes, bytearray)):
            data, name = bytes(image), name or "image"
        else:
            path = Path(image)
            name = name or path.name
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DataError(path, f"cannot read: {exc.strerror or exc}") from None
        if self.locator is not None:
            return self.locate(data, name)
        try:
            img = load_image(io.BytesIO(data), S)
        except DataError as exc:
            raise DataError(name, exc.problem) from None
        with Image.open(io.BytesIO(data)) as im:
            W, H = im.size
        return Picture(name, img, Placement.whole((H, W)))

    def locate(self, data: bytes, name: str) -> Picture:
        """A whole photograph's bytes -> Picture placed by the locator; a photograph the
        locator cannot place is a DataError with its reason."""
        try:
            pixels = load_photo(io.BytesIO(data))
        except DataError as exc:
            raise DataError(name, exc.problem) from None
        return self.place(pixels, name)

    def place(self, pixels: np.ndarray, name: str) -> Picture:
        """A decoded picture (uint8 [H, W, 3], as given) -> Picture placed by the locator;
        a picture the locator cannot place is a DataError with its reason."""
        try:
            img, placement = self.locator.locate(pixels, name)
        except DataError as exc:
            raise DataError(name, exc.problem) from None
        except RoiRejected as exc:
            raise DataError(name, exc.reason) from None
        return Picture(name, img, placement)


def picture_of(sample: Sample) -> Picture:
    """A reader's sample (`grata.domains.stream_domain`) as a Picture: a whole photograph's
    comes placed by the reader (``roi``), a crop is the whole picture."""
    placement = placement_of(sample.photo) if sample.photo is not None else \
        Placement.whole(sample.image.shape[1:])
    return Picture(sample.name, sample.image, placement)


__all__ = ["Picture", "PictureReader", "picture_of"]

"""Transitional: the data readers live in `grata.domains` (layouts, entries, the stream of
samples), `grata.decode` (decoding and its limits, photographs) and `grata.masks` (mask
conventions). These re-exports serve the modules that still import from here; import
from those modules instead. This module goes once its last importer has moved.
"""

from grata.decode import load_image, load_photo, max_pixels, quote
from grata.domains import RoiOptions, Sample, Skipped, photo_sample, stream_domain
from grata.masks import to_mask_png

__all__ = ["RoiOptions", "Sample", "Skipped", "load_image", "load_photo", "max_pixels",
           "photo_sample", "quote", "stream_domain", "to_mask_png"]

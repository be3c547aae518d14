"""The record step of `grata serve`: what one served image returns (the mask at the
picture's size, the record written as its JSON) and the JSON helpers the serving files
share."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import numpy as np

from grata.masks import to_mask_png
from grata.digest import array_sha256
from grata.metrics import vertical_cdr

RECORD_FORMAT = 1


def json_bytes(obj) -> bytes:
    """Indented JSON (no NaN) as UTF-8 bytes with a final newline."""
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode("utf-8")


def now_utc() -> str:
    """The current UTC time, ISO 8601 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def theta_digest(theta) -> str:
    """Short SHA-256 of theta's float32 bytes: tells thetas apart in records and logs."""
    return array_sha256(theta)[:16]


def finite_or_none(x) -> float | None:
    """A float for JSON: None where it is not finite."""
    x = float(x)
    return x if math.isfinite(x) else None


def serve_result(model, picture, out, key: str | None, timings: dict,
                 recovered: bool) -> dict:
    """One served image: ``{"record", "mask" (uint8 [H, W] at the picture's size: 255
    background, 128 rim, 0 cup), "pred" (bool [2, S, S]), "logits", "image" (the model's
    input), "photo" (the placement of a whole photograph, else None), "pred_full" (its
    pasted-back prediction, else None)}``. `model` is the `AdaptiveModel` whose state the
    record reports; `out` the pipeline's pasted-back outcome; `timings` in seconds."""
    mask = to_mask_png(out.full)
    disc, cup = mask < 255, mask == 0
    m, e, p = model.method, model.engine, model.predictor
    placement = picture.placement
    H, W = placement.shape
    record = {
        "format_version": RECORD_FORMAT, "image": picture.name, "key": key,
        "method": model.spec.key, "norm": str(m.norm), "predictor": p.name,
        "precision": p.precision, "model_size": model.size,
        "image_size": [int(W), int(H)],
        "disc_area_px": int(disc.sum()), "cup_area_px": int(cup.sum()),
        "disc_area_fraction": float(disc.mean()), "cup_area_fraction": float(cup.mean()),
        "vcdr": finite_or_none(vertical_cdr(np.stack([disc, cup]))),
        "timings_ms": {k: round(v * 1e3, 3) for k, v in timings.items()},
        "theta_version": model.theta_version,
        "theta_sha256": theta_digest(e.to_numpy(e.theta)),
        "theta_drift": finite_or_none(model.drift), "max_drift": model.max_drift,
        "step": int(m.steps), "images_adapted": model.n_images,
        "losses": {k: finite_or_none(v) for k, v in m.last.items()} if not recovered
        else {},
        "resets": out.resets, "recovered": recovered,
    }
    if out.decision is not None:  # which prediction was served, why, and both scores
        record["gate"] = out.decision
    located = placement.located
    record.update(placement.fields())  # where the disc was found and the ROI cut
    return {"record": record, "mask": mask, "pred": out.pred, "logits": out.logits,
            "image": picture.image, "photo": placement if located else None,
            "pred_full": out.full if located else None}


__all__ = ["RECORD_FORMAT", "finite_or_none", "json_bytes", "now_utc", "serve_result",
           "theta_digest"]

"""Who makes the served prediction of `grata serve`: a predictor (`grata.runtime.predictors`:
onnxruntime or TensorRT at the adapted theta) for the ``sample`` and ``source`` statistics,
the engine's own mixed graph (`EnginePredictor`) for ``mix`` and ``ema``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from grata.decode import IMAGE_SUFFIXES, load_image
from grata.errors import GrataError
from grata.runtime.ort_engine import route
from grata.runtime.predictors import GRAPHS, EnginePredictor, make_predictor


def serving_predictor(engine, norm, predictor: str, artifacts, *, device: str,
                      threads: int | None = None, precision: str | None = None,
                      calibration=None, cache_dir=None):
    """The predictor serving `norm` over `engine` (see the module docstring): `predictor`
    auto / onnxruntime / tensorrt on the onnxruntime `device`; `precision` and
    `calibration` (images, or a folder of them, for int8) go to TensorRT. A rule the
    chosen predictor cannot serve is one line."""
    graph = GRAPHS.get(norm)
    if graph is None:  # mix / ema: only the engine's mixed graph takes the rule
        if predictor == "tensorrt" or precision not in (None, "fp32"):
            raise GrataError(f"the tensorrt predictor serves sample and source "
                             f"statistics only, not {norm}; use "
                             f"--predictor onnxruntime (fp32)")
        route(engine, "infer", norm)  # a missing graph fails here
        return EnginePredictor(engine, norm)
    if isinstance(calibration, (str, Path)):
        calibration = calibration_images(Path(calibration), engine.size)
    return make_predictor(predictor, artifacts, graph=graph, device=device, threads=threads,
                          precision=precision, session=engine.sessions.get(graph),
                          cache_dir=cache_dir, calibration=calibration, verify=False,
                          engine=engine)


def calibration_images(folder: Path, size: int) -> list[np.ndarray]:
    """The images of a --calibration folder at the model's size."""
    if not folder.is_dir():
        raise GrataError(f"--calibration {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise GrataError(f"--calibration {folder}: no images")
    return [load_image(p, size) for p in files]


__all__ = ["calibration_images", "serving_predictor"]

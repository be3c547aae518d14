"""The device runtime: adaptation over ONNX graphs with numpy updates (no torch), the
predictors that serve the adapted model, and the crash-safe serving loop."""
from grata.runtime.ort_engine import OrtEngine

__all__ = ["OrtEngine"]

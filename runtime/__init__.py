"""The device runtime: adaptation over ONNX graphs with numpy updates (no torch), the
predictors that serve the adapted model, and the crash-safe serving loop."""
from grata.runtime.choose import open_engine
from grata.runtime.engine import OrtEngine

__all__ = ["OrtEngine", "open_engine"]

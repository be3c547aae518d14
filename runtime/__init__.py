"""The device runtime: adaptation over ONNX graphs with numpy updates (no torch), the
predictors that serve the adapted model, and the crash-safe serving loop."""
from .choose import open_engine
from .engine import OrtEngine

__all__ = ["OrtEngine", "open_engine"]

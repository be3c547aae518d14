"""The device runtime: adaptation over ONNX graphs with numpy updates (no torch)."""
from .engine import OrtEngine, open_engine

__all__ = ["OrtEngine", "open_engine"]

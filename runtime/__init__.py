"""The device runtime: adaptation over ONNX graphs with numpy updates (no torch)."""
from .engine import OrtEngine

__all__ = ["OrtEngine"]

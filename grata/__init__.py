"""grata-edge: test-time adaptation of fundus disc/cup segmentation on the device."""
import os as _os

__version__ = "0.1.0"

# onnxruntime (1.2x+ on Linux) writes a device id and an event database under the user's
# cache folder ($XDG_CACHE_HOME or ~/.cache, Microsoft/DeveloperTools/.onnxruntime) when
# it is imported, whatever GRATA_CACHE says. This variable, read at its import, stops it;
# every onnxruntime import of this project comes after this line. Set it to 0 to opt in.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

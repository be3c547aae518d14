"""`grata bench`'s library: statistics, machine probes, per-process workers, the two
suites and their tables (the command line is `grata.cli.bench`)."""

from .settings import FORWARDS_PER_IMAGE, STAGES
from .stats import measure, percentile, summarize
from .suites import stages_plan
from .workers import make_onnx_engine

__all__ = ["FORWARDS_PER_IMAGE", "STAGES", "make_onnx_engine", "measure", "percentile",
           "stages_plan", "summarize"]

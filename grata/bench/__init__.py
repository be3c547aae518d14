"""`grata bench`'s library: statistics, machine probes, per-process workers, the two
suites and their tables (the command line is `grata.cli.bench`)."""

from grata.bench.settings import FORWARDS_PER_IMAGE, STAGES
from grata.bench.stats import measure, percentile, summarize
from grata.bench.suites import stages_plan
from grata.bench.workers import make_onnx_engine

__all__ = ["FORWARDS_PER_IMAGE", "STAGES", "make_onnx_engine", "measure", "percentile",
           "stages_plan", "summarize"]

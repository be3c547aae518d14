"""Source only: the trained model with its stored BN statistics, no adaptation."""

from grata.norm import NormSpec
from grata.methods.base import Method


class Source(Method):
    name = "source"
    norm = NormSpec("source")
    fixed_norm = True  # always the stored statistics, whatever the run's choice

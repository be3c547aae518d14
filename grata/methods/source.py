"""Source only: the trained model with its stored BN statistics, no adaptation."""

from ..norm import NormSpec
from .base import Method


class Source(Method):
    name = "source"
    norm = NormSpec("source")
    fixed_norm = True  # always the stored statistics, whatever the run's choice

"""Source only: the trained model with its stored BN statistics, no adaptation."""

from .base import Method


class Source(Method):
    name = "source"
    norm = "running"

"""BN: current-image statistics instead of the stored ones, no parameter update."""

from grata.methods.base import Method


class BatchNormAdapt(Method):
    name = "bn"

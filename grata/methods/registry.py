"""The methods by name."""

from __future__ import annotations

from grata.methods.base import Method
from grata.methods.bn import BatchNormAdapt
from grata.methods.grata import GraTa, GraTaFixedLR, GraTaNoAlign
from grata.methods.source import Source
from grata.methods.tent import Tent

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (Source, BatchNormAdapt, Tent, GraTa, GraTaNoAlign, GraTaFixedLR)
}

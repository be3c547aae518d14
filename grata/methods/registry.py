"""The methods by name."""

from __future__ import annotations

from .base import Method
from .bn import BatchNormAdapt
from .grata import GraTa, GraTaFixedLR, GraTaNoAlign
from .source import Source
from .tent import Tent

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (Source, BatchNormAdapt, Tent, GraTa, GraTaNoAlign, GraTaFixedLR)
}

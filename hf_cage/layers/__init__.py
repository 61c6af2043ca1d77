"""Quantized linear layers: ``QATLinear`` (training) and ``Int4Linear`` (packed inference)."""

from .int4_linear import Int4Linear
from .qat_linear import QATLinear

__all__ = ["Int4Linear", "QATLinear"]

"""Quantized linear layers: ``QATLinear`` (training), ``Int4Linear`` and ``Fp4Linear`` (packed inference)."""

from .fp4_linear import Fp4Linear
from .int4_linear import Int4Linear
from .qat_linear import QATLinear

__all__ = ["Fp4Linear", "Int4Linear", "QATLinear"]

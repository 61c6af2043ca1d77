"""Quantization config and straight-through quantizers."""

from .config import DEFAULT_SKIP_MODULES, LLAMA_TARGET_MODULES, QuantConfig
from .ste import FakeQuantSTE, fake_quantize_ste

__all__ = ["DEFAULT_SKIP_MODULES", "LLAMA_TARGET_MODULES", "FakeQuantSTE", "QuantConfig", "fake_quantize_ste"]

"""Kernels: quantize / dequantize / fake-quantize / pack / int GEMM, each with a torch twin.

Public functions here dispatch to Triton (CUDA, or ``HF_CAGE_BACKEND=triton``) or to the torch
twins in :mod:`hf_cage.kernels.reference`. Nothing here imports triton at import time.
"""

from __future__ import annotations

import torch

from . import reference
from .dispatch import BACKEND_ENV, backend_for
from .packing import pack_int4, unpack_int4
from .reference import dequantize_rows, hadamard_block_for, hadamard_rotate, int_matmul_reference
from .spec import GAUSSIAN_MSE_CLIP, SUPPORTED_BITS, QuantSpec

__all__ = [
    "BACKEND_ENV",
    "GAUSSIAN_MSE_CLIP",
    "SUPPORTED_BITS",
    "QuantSpec",
    "backend_for",
    "dequantize_rows",
    "fake_quantize",
    "hadamard_block_for",
    "hadamard_rotate",
    "int_matmul_reference",
    "pack_int4",
    "quantize_rows",
    "unpack_int4",
]


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q(x), straight-through mask)``; see :func:`hf_cage.kernels.reference.fake_quantize`."""
    return reference.fake_quantize(x, spec)


def quantize_rows(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 codes, fp32 scales)``; see :func:`hf_cage.kernels.reference.quantize_rows`."""
    return reference.quantize_rows(x, spec)

"""Kernels: quantize / dequantize / fake-quantize / pack / int4 GEMMs, each with a torch twin.

Public functions here dispatch (:func:`backend_for`) to Triton (CUDA tensors, or
``HF_CAGE_BACKEND=triton``) or to the torch twins (:mod:`hf_cage.kernels.reference` and the
``*_reference`` functions below). Nothing here imports triton at import time: the ``triton_*``
modules load on the first Triton call.
"""

from __future__ import annotations

import torch

from . import reference
from .dispatch import BACKEND_ENV, backend_for, triton_module
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
    "quantize_with_codes",
    "unpack_int4",
    "w4a4_matmul",
    "w4a4_matmul_reference",
    "w4a16_matmul",
    "w4a16_matmul_reference",
]


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q(x), straight-through mask)``; see :func:`hf_cage.kernels.reference.fake_quantize`."""
    if backend_for(x) == "triton":
        return triton_module("triton_quant").fake_quantize(x, spec)
    return reference.fake_quantize(x, spec)


def quantize_rows(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 codes, fp32 scales)``; see :func:`hf_cage.kernels.reference.quantize_rows`."""
    if backend_for(x) == "triton":
        return triton_module("triton_quant").quantize_rows(x, spec)
    return reference.quantize_rows(x, spec)


def quantize_with_codes(
    x: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scales, Q(x), mask)`` in one pass on Triton (two torch calls on the twin)."""
    if backend_for(x) == "triton":
        return triton_module("triton_quant").quantize(x, spec, codes=True, fake=True)
    codes, scales = reference.quantize_rows(x, spec)
    return (codes, scales, *reference.fake_quantize(x, spec))


def _dequantized_packed(w_packed: torch.Tensor, w_scales: torch.Tensor, w_offset: float) -> torch.Tensor:
    """fp32 ``(N, K)`` weights ``(code + w_offset) * scale`` from packed words and ``(N,)``/``(N, G)`` scales."""
    codes = unpack_int4(w_packed).float()
    n, k = codes.shape
    scales = w_scales.float().reshape(n, -1)
    return ((codes.reshape(n, scales.shape[1], -1) + w_offset) * scales.unsqueeze(-1)).reshape(n, k)


def w4a4_matmul_reference(
    x_codes: torch.Tensor,
    x_scales: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    *,
    x_offset: float = 0.0,
    w_offset: float = 0.0,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Torch twin of the W4A4 GEMM: per-channel scales go through :func:`int_matmul_reference` (exact integer
    part, same epilogue order as the kernel); per-group scales sum each group's exact integer dot times its scale.
    """
    n = w_packed.shape[0]
    w_codes = unpack_int4(w_packed)
    scales = w_scales.float().reshape(n, -1)
    if scales.shape[1] == 1:
        return int_matmul_reference(x_codes, x_scales, w_codes, scales, x_offset, w_offset, out_dtype)
    groups = scales.shape[1]
    m, k = x_codes.shape
    xg = (x_codes.double() + x_offset).reshape(m, groups, k // groups)
    wg = (w_codes.double() + w_offset).reshape(n, groups, k // groups)
    dots = torch.einsum("mgk,ngk->mng", xg, wg).float()  # exact: small integers (or quarters) in fp64
    acc = (dots * scales.unsqueeze(0)).sum(-1)
    return (acc * x_scales.reshape(-1, 1).float()).to(out_dtype)


def w4a4_matmul(
    x_codes: torch.Tensor,
    x_scales: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    *,
    x_offset: float = 0.0,
    w_offset: float = 0.0,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``((Xc + x_offset) s_x) @ ((Wc + w_offset) s_w).T``: int8 codes (M, K) x packed int4 (N, K/8) -> (M, N).

    See :func:`hf_cage.kernels.triton_matmul.w4a4_matmul` for shapes; the twin is :func:`w4a4_matmul_reference`.
    """
    kwargs = dict(x_offset=x_offset, w_offset=w_offset, out_dtype=out_dtype)
    if backend_for(x_codes, w_packed) == "triton":
        return triton_module("triton_matmul").w4a4_matmul(x_codes, x_scales, w_packed, w_scales, **kwargs)
    return w4a4_matmul_reference(x_codes, x_scales, w_packed, w_scales, **kwargs)


def w4a16_matmul_reference(
    x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, *, w_offset: float = 0.0
) -> torch.Tensor:
    """Torch twin of the W4A16 GEMM: dequantize to the dtype of ``x``, then ``x @ W.T``."""
    return x @ _dequantized_packed(w_packed, w_scales, w_offset).to(x.dtype).T


def w4a16_matmul(
    x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, *, w_offset: float = 0.0
) -> torch.Tensor:
    """``x @ ((Wc + w_offset) s_w).T``: float ``(M, K)`` x packed int4 ``(N, K/8)`` -> ``(M, N)`` in x's dtype."""
    if backend_for(x, w_packed) == "triton":
        return triton_module("triton_matmul").w4a16_matmul(x, w_packed, w_scales, w_offset=w_offset)
    return w4a16_matmul_reference(x, w_packed, w_scales, w_offset=w_offset)

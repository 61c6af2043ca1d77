"""Turn a ``QATLinear`` into the tensors of a packed checkpoint, and back.

A quantized linear with ``in`` inputs and ``out`` outputs becomes (compressed-tensors
``pack-quantized`` names and layout, shared by both export formats):

- ``weight_packed``: int32 ``(out, in * bits / 32)``: signed codes stored as ``code + 2^(bits-1)``,
  ``32 / bits`` per word along the input dimension, lowest bits first (4 bits: :func:`hf_cage.kernels.pack_int4`);
- ``weight_scale``: fp32 ``(out, in / group)`` (``(out, 1)`` per channel): the grid step, stored in
  fp32 so ``(code + code_offset) * scale`` is exactly the training-time ``Q(W)``;
- ``weight_shape``: int64 ``(2,)``: ``[out, in]``.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..layers.qat_linear import QATLinear

PACKABLE_BITS = (4, 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(..., K)`` signed integer codes -> ``(..., K * bits / 32)`` int32 words (4 or 8 bits)."""
    if bits == 4:
        return kernels.pack_int4(codes)
    if bits != 8:
        raise ValueError(f"cannot pack {bits}-bit codes; packable widths are {PACKABLE_BITS}")
    per_word = 32 // bits
    if codes.shape[-1] % per_word:
        raise ValueError(f"the last dimension ({codes.shape[-1]}) must be a multiple of {per_word} to pack int8 codes")
    offset = 2 ** (bits - 1)
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < -offset or codes.max() >= offset):
        raise ValueError(f"int{bits} codes must lie in [{-offset}, {offset - 1}]")
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=codes.device)
    fields = (codes + offset).reshape(*codes.shape[:-1], -1, per_word)
    words = (fields << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 words -> int8 codes ``(..., K)``."""
    if bits == 4:
        return kernels.unpack_int4(packed)
    if bits != 8:
        raise ValueError(f"cannot unpack {bits}-bit codes; packable widths are {PACKABLE_BITS}")
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_codes takes int32 words, got {packed.dtype}")
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=packed.device)
    fields = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return (fields - 2 ** (bits - 1)).reshape(*packed.shape[:-1], -1).to(torch.int8)


def layer_problem(name: str, layer: QATLinear) -> str | None:
    """Why ``layer`` cannot be packed (one line naming it), or ``None`` when it can."""
    bits = layer.weight_spec.bits
    if bits not in PACKABLE_BITS:
        return f"{name}: {bits}-bit weights cannot be packed (supported: {PACKABLE_BITS})"
    per_word = 32 // bits
    if layer.in_features % per_word:
        return (
            f"{name}: in_features={layer.in_features} is not a multiple of {per_word}, needed to pack {bits}-bit codes"
        )
    return None


@torch.no_grad()
def pack_layer(layer: QATLinear) -> dict[str, torch.Tensor]:
    """``{"weight_packed", "weight_scale", "weight_shape"}`` of ``layer``'s quantized weight (see module docstring)."""
    codes, scales = kernels.quantize_rows(layer.weight.detach(), layer.weight_spec)
    return {
        "weight_packed": pack_codes(codes, layer.weight_spec.bits).cpu(),
        "weight_scale": scales.float().contiguous().cpu(),
        "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }

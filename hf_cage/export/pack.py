"""Turn a ``QATLinear`` into the tensors of a packed checkpoint, and back.

A quantized linear with ``in`` inputs and ``out`` outputs becomes (compressed-tensors
``pack-quantized`` names and layout, shared by both export formats):

- ``weight_packed``: int32 ``(out, in * bits / 32)``: signed codes stored as ``code + 2^(bits-1)``,
  ``32 / bits`` per word along the input dimension, lowest bits first (the words of :func:`hf_cage.kernels.pack_int4`);
- ``weight_scale``: fp32 ``(out, in / group)`` (``(out, 1)`` per channel): the grid step, stored in
  fp32 so ``(code + code_offset) * scale`` is exactly the training-time ``Q(W)``;
- ``weight_shape``: int64 ``(2,)``: ``[out, in]``.
"""

from __future__ import annotations

import sys

import torch

from .. import kernels
from ..layers.qat_linear import QATLinear

PACKABLE_BITS = (4, 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(..., K)`` signed integer codes -> ``(..., K * bits / 32)`` int32 words (4 or 8 bits).

    Same words as :func:`hf_cage.kernels.pack_int4` (and compressed-tensors' ``pack_to_int32``), built
    byte-wise: on a little-endian host, byte ``k`` of a word holds bits ``8k .. 8k+7``, so the fields
    can be assembled as uint8 and the buffer viewed as int32 (several times faster than shifting in int64).
    """
    if bits not in PACKABLE_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; packable widths are {PACKABLE_BITS}")
    if codes.dtype.is_floating_point:
        raise TypeError(f"pack_codes takes integer codes, got {codes.dtype}")
    per_word = 32 // bits
    if codes.shape[-1] % per_word:
        raise ValueError(f"the last dimension ({codes.shape[-1]}) must be a multiple of {per_word} to pack int{bits}")
    if sys.byteorder != "little":
        if bits == 4:
            return kernels.pack_int4(codes)
        raise NotImplementedError("int8 packing needs a little-endian host")
    offset = 2 ** (bits - 1)
    if codes.numel():
        low, high = (v.item() for v in torch.aminmax(codes))
        if low < -offset or high >= offset:
            raise ValueError(f"int{bits} codes must lie in [{-offset}, {offset - 1}]")
    fields = (codes.to(torch.int16) + offset).to(torch.uint8)
    if bits == 4:
        pairs = fields.reshape(*codes.shape[:-1], -1, 2)
        fields = pairs[..., 0] | (pairs[..., 1] << 4)
    return fields.contiguous().view(torch.int32)


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

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

import torch

from .. import kernels
from ..kernels.packing import PACKABLE_BITS, pack_codes
from ..layers.qat_linear import QATLinear


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

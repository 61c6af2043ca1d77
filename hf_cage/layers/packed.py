"""The one conversion from a trained weight to the tensors of a packed checkpoint, and back.

A quantized linear with ``in`` inputs and ``out`` outputs is stored as (compressed-tensors
``pack-quantized`` names and layout, shared by both export formats and by :class:`Int4Linear`):

- ``weight_packed``: int32 ``(out, in * bits / 32)``: signed codes stored as ``code + 2^(bits-1)``,
  ``32 / bits`` per word along the input dimension, lowest bits first (:func:`hf_cage.kernels.packing.pack_codes`);
- ``weight_scale``: fp32 ``(out, in / group)`` (``(out, 1)`` per channel): the grid step, in fp32 so
  ``(code + code_offset) * scale`` is exactly the training-time ``Q(W)``;
- ``weight_shape``: int64 ``(2,)``: ``[out, in]``.

Every caller uses :func:`pack_weight`: ``Int4Linear.from_qat_linear``, the export (a trained layer's
weight on its own grid, or a lossy re-quantization of ``Q(W)`` to another grid), and the LoRA merge
(the dequantized weight plus the adapters' delta, back on the layer's grid).
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels.packing import PACKABLE_BITS, pack_codes, unpack_codes
from ..kernels.spec import QuantSpec

PACKED_NAMES = ("weight_packed", "weight_scale", "weight_shape")


def packing_problem(in_features: int, spec: QuantSpec) -> str | None:
    """Why a weight with ``in_features`` inputs cannot be packed on ``spec``'s grid, or ``None`` when it can."""
    if spec.bits not in PACKABLE_BITS:
        return f"{spec.bits}-bit weights cannot be packed (supported: {PACKABLE_BITS})"
    per_word = 32 // spec.bits
    if in_features % per_word:
        return f"in_features={in_features} is not a multiple of {per_word}, needed to pack {spec.bits}-bit codes"
    return None


@torch.no_grad()
def pack_weight(weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Quantize ``weight`` ``(out, in)`` on ``spec``'s grid: ``{"weight_packed", "weight_scale", "weight_shape"}``.

    The tensors stay on ``weight``'s device. Raises ``ValueError`` when the weight cannot be packed.
    """
    problem = packing_problem(weight.shape[-1], spec)
    if problem:
        raise ValueError(problem)
    codes, scales = kernels.quantize_rows(weight.detach(), spec)
    return {
        "weight_packed": pack_codes(codes, spec.bits, validate=False),
        "weight_scale": scales.float().contiguous(),
        "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64),
    }


def unpack_weight(
    tensors: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`pack_weight`: the dequantized ``(out, in)`` weight ``(code + code_offset) * scale``."""
    codes = unpack_codes(tensors["weight_packed"], spec.bits)
    return kernels.dequantize_rows(codes, tensors["weight_scale"], spec, dtype)

"""The uniform grids' shared base: int8 codes, ``(code + code_offset) * step``, compressed-tensors packing.

The twin is :mod:`hf_cage.kernels.reference`, the Triton kernel :mod:`hf_cage.kernels.triton_quant`. Packing
(compressed-tensors' ``pack-quantized``): ``weight_packed`` int32 ``(out, in * bits / 32)``, signed codes stored
as ``code + 2^(bits-1)``, ``32 / bits`` per word along the inputs, lowest bits first (4 and 8 bits:
:func:`hf_cage.kernels.packing.pack_codes`; 2 and 3 bits packed densely, a code may straddle two words:
compressed-tensors' own ``pack_to_int32``); ``weight_scale`` fp32 ``(out, in / group)``, the grid step;
``weight_shape`` int64 ``[out, in]``.
"""

from __future__ import annotations

import math

import torch

from .. import reference, tiles
from ..dispatch import quantize_rows, triton_module
from ..grid import Grid
from ..packing import DENSE_PACKED_BITS, PACKABLE_BITS, pack_int_codes, unpack_int_codes

PACKING = "pack-quantized: code + 2^(bits-1), 32/bits codes per int32 along inputs, lowest bits first"


class UniformGrid(Grid):
    """A grid of ``2^b`` evenly spaced levels with one scale per row, group or token."""

    integer_codes = True
    packed_layer = "Int4Linear"
    packing = PACKING
    stock_format = "compressed-tensors"
    card_grid = ""  # the card's word for the grid in the activation row

    def fake_quantize(self, x, spec, backend, global_scale=None):
        if backend == "triton":
            return triton_module("triton_quant").fake_quantize(x, spec)
        return reference.fake_quantize(x, spec)

    def triton_problem(self, in_features, spec):
        try:
            tiles.quant_layout(in_features, spec)
        except ValueError as err:
            return str(err)
        return None

    def packing_problem(self, in_features, spec):
        bits = (*DENSE_PACKED_BITS, *PACKABLE_BITS)
        if spec.bits not in bits:
            return f"{spec.bits}-bit weights cannot be packed (supported: {bits})"
        per_words = 32 // math.gcd(32, spec.bits)  # codes that fill a whole number of int32 words
        if in_features % per_words:
            return f"in_features={in_features} is not a multiple of {per_words}, needed to pack {spec.bits}-bit codes"
        return None

    def pack(self, weight, spec, backend):
        codes, scales = quantize_rows(weight, spec, backend)
        return {
            "weight_packed": pack_int_codes(codes, spec.bits),
            "weight_scale": scales.float().contiguous(),
            "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        }

    def unpack(self, tensors, spec, dtype):
        packed = tensors["weight_packed"]
        codes = unpack_int_codes(packed, spec.bits, packed.shape[-1] * 32 // spec.bits)
        return reference.dequantize_rows(codes, tensors["weight_scale"], spec, dtype)

    def packed_buffers(self, out_features, in_features, spec, device=None):
        groups = in_features // (spec.group_size or in_features)
        words = in_features * spec.bits // 32
        return {
            "weight_packed": torch.zeros(out_features, words, dtype=torch.int32, device=device),
            "weight_scale": torch.ones(out_features, groups, dtype=torch.float32, device=device),
        }

    def card_activations(self, a_bits, group_size, a_clip):
        return f"{a_bits}-bit per token, {self.card_grid} grid, `a_clip={a_clip!r}`"

    def card_tag(self, w_bits):
        return f"int{w_bits}"

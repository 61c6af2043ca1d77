"""The FP4 grids' shared base: E2M1 values times a group scale, compressed-tensors' FP4 rules and packing.

The twin is :mod:`hf_cage.kernels.fp4`, the Triton kernel :mod:`hf_cage.kernels.triton_fp4` (it takes every
shape a whole number of groups allows). Packing (compressed-tensors' ``{mx,nv}fp4-pack-quantized``):
``weight_packed`` uint8 ``(out, in / 2)``, two E2M1 codes per byte, even input in the low nibble;
``weight_scale`` ``(out, in / group)``; ``weight_global_scale`` fp32 ``(1,)`` when the format has one.
``e2m1(code) * scale`` is exactly the training-time ``Q(W)``; with a Hadamard rotation (hf-cage format only)
the codes are in the rotated basis and the weight is rotated back.
"""

from __future__ import annotations

import torch

from .. import fp4
from ..dispatch import triton_module
from ..grid import Grid
from ..spec import QuantSpec

PACKING = "fp4: E2M1 codes (sign bit 3), two per uint8 along inputs, even input in the low nibble"


class E2M1Grid(Grid):
    """An FP4 grid of :mod:`hf_cage.kernels.fp4`: 4-bit, its format's group and scale rule."""

    bits = (4,)
    fixed_scale_rule = "absmax"
    default_activation_clip = "absmax"
    packed_layer = "Fp4Linear"
    packing = PACKING
    scale_dtype: torch.dtype = torch.uint8  # dtype of the stored group scales
    global_scale = False  # the weights carry a per-tensor fp32 ``weight_global_scale``
    card_activation_rule = ""  # the card: how the stock loaders quantize activations, "with <rule>"

    @property
    def stock_format(self) -> str:
        return f"{self.name}-pack-quantized"

    def _twin(self, backend: str):
        return triton_module("triton_fp4") if backend == "triton" else fp4

    def fake_quantize(self, x, spec, backend, global_scale=None):
        return self._twin(backend).fake_quantize(
            x, self.name, hadamard_block=spec.hadamard_block, global_scale=global_scale
        )

    def triton_problem(self, in_features, spec):
        return None  # the FP4 Triton quantizer takes every shape a whole number of groups allows

    def quantize_codes(
        self, x: torch.Tensor, spec: QuantSpec, backend: str, global_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(E2M1 codes, group scales, global scale or None)``; see :func:`hf_cage.kernels.fp4.quantize`."""
        twin = self._twin(backend)
        quantize = fp4.quantize if twin is fp4 else twin.quantize_codes
        return quantize(x, self.name, hadamard_block=spec.hadamard_block, global_scale=global_scale)

    def packing_problem(self, in_features, spec):
        if in_features % self.fixed_group_size:
            return f"in_features={in_features} is not a multiple of the {self.name} group size {self.fixed_group_size}"
        return None

    def pack(self, weight, spec, backend):
        codes, scales, global_scale = self.quantize_codes(weight, spec, backend)
        tensors = {"weight_packed": fp4.pack_fp4(codes), "weight_scale": scales.contiguous()}
        if global_scale is not None:
            tensors["weight_global_scale"] = global_scale.float().reshape(1)
        return tensors

    def unpack(self, tensors, spec, dtype):
        return fp4.dequantize(
            fp4.unpack_fp4(tensors["weight_packed"]),
            tensors["weight_scale"],
            self.name,
            global_scale=tensors.get("weight_global_scale"),
            hadamard_block=spec.hadamard_block,
            dtype=dtype,
        )

    def packed_buffers(self, out_features, in_features, spec, device=None):
        buffers = {
            "weight_packed": torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
            "weight_scale": torch.zeros(
                out_features, in_features // self.fixed_group_size, dtype=self.scale_dtype, device=device
            ),
        }
        if self.global_scale:
            buffers["weight_global_scale"] = torch.ones(1, dtype=torch.float32, device=device)
        return buffers

    def card_activations(self, a_bits, group_size, a_clip):
        calibrated = ", calibrated per-layer `input_global_scale`" if self.input_global_scale else ""
        return (
            f"4-bit per token and group of {group_size}, {self.name.upper()} (E2M1) grid, dynamic group scales"
            + calibrated
        )

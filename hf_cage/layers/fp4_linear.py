"""``Fp4Linear``: a packed MXFP4 / NVFP4 linear for inference (what FP4 exports load into).

No FP4 tensor core is used: the forward dequantizes the packed weight to the input's dtype and runs
``F.linear``, which is also what stock transformers does with such a checkpoint (it decompresses to
bf16 at load). With fp32 inputs the output equals the QAT layer's forward bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels.spec import FP4_GROUP_SIZE, QuantSpec
from .packed import FP4_PACKED_NAMES, PackedLinear, packing_problem


class Fp4Linear(PackedLinear):
    """Linear layer holding E2M1 weight codes packed two per byte plus their group scales.

    Buffers (compressed-tensors ``{mx,nv}fp4-pack-quantized`` names): ``weight_packed`` uint8
    ``(out, in / 2)`` (codes in the rotated basis when ``weight_spec.hadamard_block`` is set),
    ``weight_scale`` ``(out, in / group)`` (uint8 E8M0 for MXFP4, float8_e4m3fn for NVFP4), and for
    NVFP4 ``weight_global_scale`` fp32 ``(1,)``; NVFP4 with activations adds ``input_global_scale`` fp32
    ``(1,)``, the calibrated global scale of the inputs. Inputs are quantized per token group with
    ``activation_spec`` when given.
    """

    packed_names = FP4_PACKED_NAMES

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_spec: QuantSpec,
        activation_spec: QuantSpec | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not weight_spec.is_fp4:
            raise ValueError(f"Fp4Linear holds mxfp4 / nvfp4 weights, got grid={weight_spec.grid!r}")
        problem = packing_problem(in_features, weight_spec)
        if problem:
            raise ValueError(problem)
        group = FP4_GROUP_SIZE[weight_spec.grid]
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.activation_spec = weight_spec, activation_spec
        nvfp4 = weight_spec.grid == "nvfp4"
        scale_dtype = torch.float8_e4m3fn if nvfp4 else torch.uint8
        self.register_buffer(
            "weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.zeros(out_features, in_features // group, dtype=scale_dtype, device=device)
        )
        if nvfp4:
            self.register_buffer("weight_global_scale", torch.ones(1, dtype=torch.float32, device=device))
        if activation_spec is not None and activation_spec.grid == "nvfp4":
            self.register_buffer("input_global_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_spec is not None:
            global_scale = getattr(self, "input_global_scale", None)
            x = kernels.fake_quantize(x, self.activation_spec, global_scale=global_scale)[0]
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        a_bits = self.activation_spec.bits if self.activation_spec else None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, grid={self.weight_spec.grid}, "
            f"a_bits={a_bits}, hadamard_block={self.weight_spec.hadamard_block}"
        )

"""``Int4Linear``: a packed 4-bit linear for inference (what exported checkpoints load into)."""

from __future__ import annotations

import torch

from .. import kernels
from .packed import PackedLinear


class Int4Linear(PackedLinear):
    """Linear layer holding int4 weight codes packed 8 per int32 plus fp32 scales.

    Buffers: ``weight_packed`` int32 ``(out, in / 8)`` (compressed-tensors layout, codes in the
    rotated basis when ``weight_spec.hadamard_block`` is set) and ``weight_scale`` fp32
    ``(out, in / group)``. Inputs are quantized per token with ``activation_spec`` when given, so
    the output equals the QAT layer's forward. On the Triton backend the forward multiplies the
    packed words directly (W4A4 GEMM for 4-bit activations, W4A16 otherwise; :func:`hf_cage.kernels.int4_gemm`,
    decided once at build time in ``kernel_plan`` like :class:`~hf_cage.QATLinear`'s). Takes the arguments of
    :class:`~hf_cage.layers.packed.PackedLinear`.
    """

    holds_bits = (4,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_plan.backend(x, self.weight_packed) == "triton":
            return self._forward_packed(x)
        return super().forward(x)

    def _forward_packed(self, x: torch.Tensor) -> torch.Tensor:
        """Triton path: the GEMM of ``kernel_plan`` reads ``weight_packed`` directly (W4A4 or W4A16)."""
        a_spec, w_spec = self.activation_spec, self.weight_spec
        x2 = x.reshape(-1, self.in_features)
        if self.kernel_plan.gemm == "w4a4":
            codes, scales = kernels.quantize_rows(x2, a_spec, backend="triton")
            out = kernels.w4a4_matmul(
                codes,
                scales,
                self.weight_packed,
                self.weight_scale,
                x_offset=a_spec.code_offset,
                w_offset=w_spec.code_offset,
                out_dtype=x.dtype,
                backend="triton",
            )
        else:
            if a_spec is not None:
                x2 = kernels.fake_quantize(x2, a_spec, backend="triton")[0]
            if w_spec.hadamard_block:
                # The codes live in the rotated basis: x @ (Wr H).T = (x H) @ Wr.T, H symmetric.
                x2 = kernels.hadamard_rotate(x2.float(), w_spec.hadamard_block).to(x.dtype)
            out = kernels.w4a16_matmul(
                x2, self.weight_packed, self.weight_scale, w_offset=w_spec.code_offset, backend="triton"
            )
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        a_bits = self.activation_spec.bits if self.activation_spec else None
        return f"in_features={self.in_features}, out_features={self.out_features}, w_bits=4, a_bits={a_bits}"

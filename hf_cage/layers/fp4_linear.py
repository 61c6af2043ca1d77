"""``Fp4Linear``: a packed MXFP4 / NVFP4 linear for inference (what FP4 exports load into).

No FP4 tensor core is used: the forward dequantizes the packed weight to the input's dtype and runs
``F.linear``, which is also what stock transformers does with such a checkpoint (it decompresses to
bf16 at load). With fp32 inputs the output equals the QAT layer's forward bit for bit.
"""

from __future__ import annotations

from .packed import PackedLinear


class Fp4Linear(PackedLinear):
    """Linear layer holding E2M1 weight codes packed two per byte plus their group scales.

    Buffers (compressed-tensors ``{mx,nv}fp4-pack-quantized`` names): ``weight_packed`` uint8
    ``(out, in / 2)`` (codes in the rotated basis when ``weight_spec.hadamard_block`` is set),
    ``weight_scale`` ``(out, in / group)`` (uint8 E8M0 for MXFP4, float8_e4m3fn for NVFP4), and for
    NVFP4 ``weight_global_scale`` fp32 ``(1,)``; NVFP4 with activations adds ``input_global_scale`` fp32
    ``(1,)``, the calibrated global scale of the inputs. Inputs are quantized per token group with
    ``activation_spec`` when given. Takes the arguments of :class:`~hf_cage.layers.packed.PackedLinear`.
    """

    def extra_repr(self) -> str:
        a_bits = self.activation_spec.bits if self.activation_spec else None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, grid={self.weight_spec.grid}, "
            f"a_bits={a_bits}, hadamard_block={self.weight_spec.hadamard_block}"
        )

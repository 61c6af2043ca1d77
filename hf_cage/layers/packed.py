"""The one conversion from a trained weight to the tensors of a packed checkpoint, and back.

A quantized linear with ``in`` inputs and ``out`` outputs is stored with compressed-tensors' names and
layouts, shared by every export format and by the packed inference layers:

- integer and QuEST grids (``pack-quantized``):

  - ``weight_packed``: int32 ``(out, in * bits / 32)``: signed codes stored as ``code + 2^(bits-1)``,
    ``32 / bits`` per word along the input dimension, lowest bits first
    (:func:`hf_cage.kernels.packing.pack_codes`, 4 and 8 bits); 2- and 3-bit codes are packed densely, a code
    may straddle two words (compressed-tensors' own ``pack_to_int32``, which its loaders unpack);
  - ``weight_scale``: fp32 ``(out, in / group)`` (``(out, 1)`` per channel): the grid step, in fp32 so
    ``(code + code_offset) * scale`` is exactly the training-time ``Q(W)``;
  - ``weight_shape``: int64 ``(2,)``: ``[out, in]``.

- FP4 grids (``mxfp4-pack-quantized`` / ``nvfp4-pack-quantized``, :mod:`hf_cage.kernels.fp4`):

  - ``weight_packed``: uint8 ``(out, in / 2)``: two E2M1 codes per byte, even input in the low nibble;
  - ``weight_scale``: ``(out, in / group)``: uint8 E8M0 exponents (MXFP4, group 32) or float8_e4m3fn
    (NVFP4, group 16);
  - ``weight_global_scale``: fp32 ``(1,)`` (NVFP4 only): the tensor's ``448 * 6 / amax``.

  ``e2m1(code) * scale`` (NVFP4: ``scale / global_scale``) is exactly the training-time ``Q(W)``; with a
  Hadamard rotation (hf-cage format only) the codes are in the rotated basis and the weight is rotated back.

Every caller uses :func:`pack_weight`: :meth:`PackedLinear.from_qat_linear`, the export (a trained layer's
weight on its own grid, or a lossy re-quantization of ``Q(W)`` to another grid), and the LoRA merge
(the dequantized weight plus the adapters' delta, back on the layer's grid).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import kernels
from ..kernels import fp4
from ..kernels.packing import PACKABLE_BITS, pack_codes, unpack_codes
from ..kernels.spec import FP4_GROUP_SIZE, QuantSpec

PACKED_NAMES = ("weight_packed", "weight_scale", "weight_shape")
FP4_PACKED_NAMES = ("weight_packed", "weight_scale", "weight_global_scale")
# Widths packed densely across int32 words by compressed-tensors' own ``pack_to_int32`` (what its loaders unpack).
DENSE_PACKED_BITS = (2, 3)


def packing_problem(in_features: int, spec: QuantSpec) -> str | None:
    """Why a weight with ``in_features`` inputs cannot be packed on ``spec``'s grid, or ``None`` when it can."""
    if spec.is_fp4:
        group = FP4_GROUP_SIZE[spec.grid]
        if in_features % group:
            return f"in_features={in_features} is not a multiple of the {spec.grid} group size {group}"
        return None
    bits = (*DENSE_PACKED_BITS, *PACKABLE_BITS)
    if spec.bits not in bits:
        return f"{spec.bits}-bit weights cannot be packed (supported: {bits})"
    per_words = 32 // math.gcd(32, spec.bits)  # codes that fill a whole number of int32 words
    if in_features % per_words:
        return f"in_features={in_features} is not a multiple of {per_words}, needed to pack {spec.bits}-bit codes"
    return None


def pack_int_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(out, in)`` signed integer codes -> ``(out, in * bits / 32)`` int32 words of ``pack-quantized``."""
    if bits in DENSE_PACKED_BITS:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        return pack_to_int32(codes.to(torch.int8), bits)
    return pack_codes(codes, bits, validate=False)


def unpack_int_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int_codes`: ``(out, in)`` int8 codes."""
    if bits in DENSE_PACKED_BITS:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        return unpack_from_int32(packed, bits, torch.Size((packed.shape[0], in_features)))
    return unpack_codes(packed, bits)


@torch.no_grad()
def pack_weight(weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Quantize ``weight`` ``(out, in)`` on ``spec``'s grid: the tensors listed in the module docstring.

    The tensors stay on ``weight``'s device. Raises ``ValueError`` when the weight cannot be packed.
    """
    problem = packing_problem(weight.shape[-1], spec)
    if problem:
        raise ValueError(problem)
    # The one conversion runs wherever the weight is, on the quantizer its shape allows (decided like a layer's).
    plan = kernels.plan_layer("pack_weight", weight.shape[-1], spec, None, quantizes_weight=True, gemm=None)
    backend = plan.backend(weight)
    if spec.is_fp4:
        codes, scales, global_scale = kernels.quantize_fp4(weight.detach(), spec, backend=backend)
        tensors = {"weight_packed": fp4.pack_fp4(codes), "weight_scale": scales.contiguous()}
        if global_scale is not None:
            tensors["weight_global_scale"] = global_scale.float().reshape(1)
        return tensors
    codes, scales = kernels.quantize_rows(weight.detach(), spec, backend=backend)
    return {
        "weight_packed": pack_int_codes(codes, spec.bits),
        "weight_scale": scales.float().contiguous(),
        "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64),
    }


def unpack_weight(
    tensors: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`pack_weight`: the dequantized ``(out, in)`` weight (``Q(W)``, computed in fp32)."""
    if spec.is_fp4:
        return fp4.dequantize(
            fp4.unpack_fp4(tensors["weight_packed"]),
            tensors["weight_scale"],
            spec.grid,
            global_scale=tensors.get("weight_global_scale"),
            hadamard_block=spec.hadamard_block,
            dtype=dtype,
        )
    packed = tensors["weight_packed"]
    in_features = packed.shape[-1] * 32 // spec.bits
    codes = unpack_int_codes(packed, spec.bits, in_features)
    return kernels.dequantize_rows(codes, tensors["weight_scale"], spec, dtype)


class PackedLinear(nn.Module):
    """What the packed inference layers share (:class:`~hf_cage.Int4Linear`, :class:`~hf_cage.layers.Fp4Linear`).

    A subclass registers the buffers named in ``packed_names`` (those it has) with the layouts of
    :func:`pack_weight` and takes ``(in_features, out_features, bias, weight_spec, activation_spec, device,
    dtype)``; NVFP4 layers with activations also hold ``input_global_scale``.
    """

    packed_names: tuple[str, ...] = ()

    @classmethod
    def from_qat_linear(cls, layer):
        """Pack a trained :class:`~hf_cage.QATLinear`; the dequantized weight equals its ``Qw(W)`` exactly."""
        new = cls(
            layer.in_features,
            layer.out_features,
            layer.bias is not None,
            layer.weight_spec,
            layer.activation_spec,
            device=layer.weight.device,
            dtype=layer.weight.dtype,
        )
        new.load_packed(pack_weight(layer.weight, layer.weight_spec))
        if hasattr(new, "input_global_scale"):
            new.input_global_scale.copy_(layer.input_global_scale)
        if layer.bias is not None:
            new.bias.data.copy_(layer.bias.detach())
        return new

    @torch.no_grad()
    def load_packed(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy in the tensors of :func:`pack_weight` (``weight_shape``, shapes and dtypes checked)."""
        for name, tensor in tensors.items():
            if name == "weight_shape":
                if tensor.tolist() != [self.out_features, self.in_features]:
                    raise ValueError(f"weight_shape {tensor.tolist()} != [{self.out_features}, {self.in_features}]")
                continue
            buffer = getattr(self, name)
            if buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                raise ValueError(
                    f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(buffer.shape)} {buffer.dtype}"
                )
            buffer.copy_(tensor)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The layer's tensors of :func:`pack_weight` (what :func:`unpack_weight` reads)."""
        return {n: getattr(self, n) for n in self.packed_names if hasattr(self, n)}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``Q(W)`` computed in fp32 (the trained weight), cast to ``dtype``."""
        return unpack_weight(self.packed_tensors(), self.weight_spec, dtype)

"""The one conversion from a trained weight to the tensors of a packed checkpoint, and back; the packed layer.

A quantized linear is stored with compressed-tensors' names (``weight_packed`` first, then its scales) in the
layouts its grid defines (:meth:`hf_cage.kernels.grid.Grid.pack`; the uniform grids' ``pack-quantized`` in
:mod:`hf_cage.kernels.grids._uniform`, the FP4 grids' in :mod:`hf_cage.kernels.grids._e2m1`), shared by every
export format and by the packed inference layers. The dequantized tensors are exactly the training-time ``Q(W)``.

Every caller uses :func:`pack_weight`: :meth:`PackedLinear.from_qat_linear`, the export (a trained layer's
weight on its own grid, or a lossy re-quantization of ``Q(W)`` to another grid), and the LoRA merge
(the dequantized weight plus the adapters' delta, back on the layer's grid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels.spec import QuantSpec


def packing_problem(in_features: int, spec: QuantSpec) -> str | None:
    """Why a weight with ``in_features`` inputs cannot be packed on ``spec``'s grid, or ``None`` when it can."""
    return spec.quant_grid.packing_problem(in_features, spec)


@torch.no_grad()
def pack_weight(weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Quantize ``weight`` ``(out, in)`` on ``spec``'s grid: the tensors of :meth:`~hf_cage.kernels.grid.Grid.pack`.

    The tensors stay on ``weight``'s device. Raises ``ValueError`` when the weight cannot be packed.
    """
    problem = packing_problem(weight.shape[-1], spec)
    if problem:
        raise ValueError(problem)
    # The one conversion runs wherever the weight is, on the quantizer its shape allows (decided like a layer's).
    plan = kernels.plan_layer("pack_weight", weight.shape[-1], spec, None, quantizes_weight=True, gemm=None)
    return spec.quant_grid.pack(weight.detach(), spec, plan.backend(weight))


def unpack_weight(
    tensors: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`pack_weight`: the dequantized ``(out, in)`` weight (``Q(W)``, computed in fp32)."""
    return spec.quant_grid.unpack(tensors, spec, dtype)


_PACKED_CLASSES: dict[str, type] = {}


def packed_linear_class(spec: QuantSpec) -> type:
    """The packed layer class that ``spec``'s grid loads into (``Grid.packed_layer``)."""
    return _PACKED_CLASSES[spec.quant_grid.packed_layer]


class PackedLinear(nn.Module):
    """A linear holding its weight as its grid packs it (:func:`pack_weight`), for inference.

    Buffers: those of :meth:`~hf_cage.kernels.grid.Grid.packed_buffers` (``packed_names``), plus
    ``input_global_scale`` fp32 ``(1,)`` when the activation grid calibrates one. The forward quantizes the inputs
    with ``activation_spec`` when given and runs ``F.linear`` on the dequantized weight, so it equals the QAT
    layer's forward. A grid loads into the class its ``packed_layer`` names: this one, or a subclass with a faster
    forward (:class:`~hf_cage.Int4Linear`, :class:`~hf_cage.layers.Fp4Linear`).
    """

    holds_bits: tuple[int, ...] | None = None  # weight widths a subclass takes (None: any its grid packs)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _PACKED_CLASSES[cls.__name__] = cls

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
        grid = weight_spec.quant_grid
        layer = type(self).__name__
        if layer not in ("PackedLinear", grid.packed_layer):
            raise ValueError(f"{layer} cannot hold {grid.name} weights; that grid loads into {grid.packed_layer}")
        if self.holds_bits and weight_spec.bits not in self.holds_bits:
            bits = "/".join(map(str, self.holds_bits))
            raise ValueError(f"{layer} holds {bits}-bit weights, got bits={weight_spec.bits} (grid {grid.name!r})")
        problem = packing_problem(in_features, weight_spec)
        if problem:
            raise ValueError(problem)
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.activation_spec = weight_spec, activation_spec
        buffers = grid.packed_buffers(out_features, in_features, weight_spec, device)
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)
        self.packed_names = tuple(buffers)
        if activation_spec is not None and activation_spec.quant_grid.input_global_scale:
            self.register_buffer("input_global_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.kernel_plan = kernels.plan_layer(
            layer,
            in_features,
            weight_spec,
            activation_spec,
            quantizes_weight=False,
            gemm=kernels.int4_gemm(weight_spec, activation_spec, in_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_spec is not None:
            backend = self.kernel_plan.backend(x, self.weight_packed)
            global_scale = getattr(self, "input_global_scale", None)
            x = kernels.fake_quantize(x, self.activation_spec, backend=backend, global_scale=global_scale)[0]
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        a_bits = self.activation_spec.bits if self.activation_spec else None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, grid={self.weight_spec.grid}, "
            f"w_bits={self.weight_spec.bits}, a_bits={a_bits}, hadamard_block={self.weight_spec.hadamard_block}"
        )

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
        return {n: getattr(self, n) for n in self.packed_names}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``Q(W)`` computed in fp32 (the trained weight), cast to ``dtype``."""
        return unpack_weight(self.packed_tensors(), self.weight_spec, dtype)


_PACKED_CLASSES[PackedLinear.__name__] = PackedLinear

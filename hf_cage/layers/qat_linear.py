"""``QATLinear``: the training-time quantized linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..quant.config import QuantConfig
from ..quant.ste import fake_quantize_ste


class QATLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is ``F.linear(Qa(x), Qw(W), b)`` with straight-through gradients.

    The full-precision ``weight`` stays the trained parameter; ``Qw`` is recomputed every forward.
    ``weight_spec`` / ``activation_spec`` are the grids (see :class:`hf_cage.kernels.QuantSpec`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        quant_config: QuantConfig,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.quant_config = quant_config
        self.weight_spec = quant_config.weight_spec(in_features)
        self.activation_spec = quant_config.activation_spec(in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_config: QuantConfig) -> QATLinear:
        """Wrap ``linear``; the new layer shares its ``weight`` and ``bias`` Parameters (no copy)."""
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_config=quant_config)
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's Parameters (the un-quantized model)."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    @torch.no_grad()
    def weight_quantizer(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``Qw(weight)`` (default: this layer's weight) in the weight's basis and dtype, without autograd."""
        return kernels.fake_quantize(self.weight if weight is None else weight, self.weight_spec)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fake_quantize_ste(x, self.activation_spec)
        return F.linear(x, fake_quantize_ste(self.weight, self.weight_spec), self.bias)

    def extra_repr(self) -> str:
        a_bits = self.quant_config.a_bits
        return (
            f"{super().extra_repr()}, quantizer={self.quant_config.quantizer}, "
            f"w_bits={self.quant_config.w_bits}, a_bits={a_bits}, hadamard_block={self.weight_spec.hadamard_block}"
        )

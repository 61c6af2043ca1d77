"""``QATLinear``: the training-time quantized linear."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..kernels.spec import QuantSpec
from ..quant.config import QuantConfig
from ..quant.ste import quantized_linear, straight_through


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """What ``F.linear`` would return: the autocast dtype when autocast is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _W4A4LinearSTE(torch.autograd.Function):
    """``Qa(x) @ Qw(W).T + b`` on the int4 GEMM, with the straight-through backward of the torch path.

    Forward: one fused quantizer pass per operand gives codes + scales (for the GEMM) and ``Q`` +
    mask (kept for backward); the weight codes are packed and multiplied by the W4A4 kernel.
    Backward: ordinary matmuls on ``Q(W)`` and ``Q(x)``, masked by :func:`hf_cage.quant.ste.straight_through`.
    Only built for layers whose plan says Triton (so every kernel below runs on the backend of ``x``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight_spec: QuantSpec, activation_spec: QuantSpec):
        x2 = x.reshape(-1, x.shape[-1])
        x_codes, x_scales, x_q, x_mask = kernels.quantize_with_codes(x2, activation_spec)
        w_codes, w_scales, w_q, w_mask = kernels.quantize_with_codes(weight, weight_spec)
        out = kernels.w4a4_matmul(
            x_codes,
            x_scales,
            kernels.pack_int4(w_codes, validate=False),
            w_scales,
            x_offset=activation_spec.code_offset,
            w_offset=weight_spec.code_offset,
            out_dtype=_output_dtype(x),
        )
        if bias is not None:
            out = out + bias.to(out.dtype)
        ctx.save_for_backward(x_q, x_mask, w_q, w_mask)
        ctx.specs = (weight_spec, activation_spec)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x_q, x_mask, w_q, w_mask = ctx.saved_tensors
        weight_spec, activation_spec = ctx.specs
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        # Matmuls in the output gradient's dtype (bf16 under autocast, like F.linear's backward there).
        if ctx.needs_input_grad[0]:
            grad_x = straight_through((g @ w_q.to(g.dtype)).to(x_q.dtype), x_mask, activation_spec)
            grad_x = grad_x.reshape(*grad.shape[:-1], -1)
        if ctx.needs_input_grad[1]:
            grad_w = straight_through((g.T @ x_q.to(g.dtype)).to(w_q.dtype), w_mask, weight_spec)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


class QATLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is ``F.linear(Qa(x), Qw(W), b)`` with straight-through gradients.

    On the Triton backend (CUDA, or ``HF_CAGE_BACKEND=triton``) the quantizers are the fused Triton
    kernels, and W4A4 layers multiply int4 codes on the W4A4 GEMM instead of ``F.linear``. Whether Triton can
    take this layer's shape is decided once, here (``kernel_plan``, :func:`hf_cage.kernels.plan_layer`); a
    layer it cannot take runs on the torch twins on every device, which is logged once.

    The full-precision ``weight`` stays the trained parameter; ``Qw`` is recomputed every forward.
    ``weight_spec`` / ``activation_spec`` are the grids (see :class:`hf_cage.kernels.QuantSpec`).

    FP4 grids (``mxfp4``, ``nvfp4``) always run fake quantization and ``F.linear`` (no FP4 tensor core).
    NVFP4 activations need one fp32 global scale per layer, which the served model reads from the
    checkpoint (compressed-tensors' ``input_global_scale``, a static scale): the buffer
    ``input_global_scale`` is calibrated by the static_minmax rule llm-compressor uses, the running maximum
    of ``|input|`` (stored as ``448 * 6 / amax``): every forward in training mode lowers it to cover the
    batch, the first forward sets it (0 means not yet calibrated), and in eval mode it is frozen. It is
    saved with the model and exported, so the exported model quantizes activations exactly as the
    evaluated one. Under DDP torch broadcasts rank 0's buffers before each forward, so the ranks share one
    scale. Not handled: under FSDP2 the CAGE correction quantizes each rank's row shard, and NVFP4's per-tensor
    weight global scale is then the shard's own, so the pull targets a slightly different grid than the forward.
    Nor is ``input_global_scale`` under FSDP2: FSDP2 does not broadcast buffers, so each rank calibrates its
    own from its own batches, and only rank 0's (saved by the checkpoint) is exported; the other ranks trained
    with slightly different activation scales than the exported model serves.
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
        gemm = kernels.int4_gemm(self.weight_spec, self.activation_spec, in_features)
        self.kernel_plan = kernels.plan_layer(
            "QATLinear",
            in_features,
            self.weight_spec,
            self.activation_spec,
            quantizes_weight=True,
            gemm="w4a4" if gemm == "w4a4" else None,
        )
        if self.activation_spec is not None and self.activation_spec.quant_grid.input_global_scale:
            self.register_buffer("input_global_scale", torch.zeros(1, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_config: QuantConfig) -> QATLinear:
        """Wrap ``linear``; the new layer shares its ``weight`` and ``bias`` Parameters (no copy)."""
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_config=quant_config)
        layer.weight = linear.weight
        layer.bias = linear.bias
        if hasattr(layer, "input_global_scale"):  # built on meta: a real, uncalibrated buffer
            layer.input_global_scale = torch.zeros(1, dtype=torch.float32, device=linear.weight.device)
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
        weight = self.weight if weight is None else weight
        return kernels.fake_quantize(weight, self.weight_spec, backend=self.kernel_plan.backend(weight))[0]

    @torch.no_grad()
    def activation_global_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """Grids with ``input_global_scale`` (NVFP4): the buffer, first updated by the calibration rule (class
        docstring) with the batch ``x``; ``None`` for other grids."""
        scale = getattr(self, "input_global_scale", None)
        if scale is None:
            return None
        if self.training or not bool(scale > 0):  # eval: one check that it was calibrated
            spec = self.activation_spec
            batch = spec.quant_grid.observed_input_scale(x.detach(), spec).to(scale.device)
            scale.copy_(torch.where(scale > 0, torch.minimum(scale, batch), batch))
        return scale

    def uses_int4_matmul(self, x: torch.Tensor) -> bool:
        """True when the forward runs on the W4A4 Triton GEMM (see :func:`hf_cage.kernels.int4_gemm`)."""
        return self.kernel_plan.gemm == "w4a4" and self.kernel_plan.backend(x, self.weight) == "triton"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_int4_matmul(x):
            return _W4A4LinearSTE.apply(x, self.weight, self.bias, self.weight_spec, self.activation_spec)
        backend = self.kernel_plan.backend(x, self.weight)
        global_scale = self.activation_global_scale(x)
        return quantized_linear(
            x, self.weight, self.bias, self.weight_spec, self.activation_spec, backend, global_scale
        )

    def extra_repr(self) -> str:
        a_bits = self.quant_config.a_bits
        return (
            f"{super().extra_repr()}, quantizer={self.quant_config.quantizer}, "
            f"w_bits={self.quant_config.w_bits}, a_bits={a_bits}, hadamard_block={self.weight_spec.hadamard_block}"
        )

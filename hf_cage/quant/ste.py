"""Straight-through fake quantization.

Forward returns ``Q(x)``; backward passes the gradient through unchanged where the value was
representable and zeroes it where it was clipped (QuEST's trust mask). With a Hadamard rotation
``H`` the mask lives in the rotated basis, so the gradient is ``H (mask * (H g))`` (``H`` is its
own inverse). :func:`straight_through` is that backward, the only one: :class:`FakeQuantSTE`,
:class:`QuantizedLinearSTE` and the fused W4A4 layer function (:mod:`hf_cage.layers.qat_linear`) call it.

:func:`quantized_linear` is ``F.linear(Qa(x), Qw(W), b)`` with both straight-through gradients. On the torch
backend (the CPU path) it is one autograd function, :class:`QuantizedLinearSTE`, with the same forward and two
savings in the backward: it keeps each operand's int8 codes (the trust mask folded in) and scales instead of a
float ``Q`` plus a mask, and it multiplies the output gradient by the operands in their rotated basis, so the
inner ``H g`` of the straight-through gradient costs no rotation (6 rotations per layer step instead of 8).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from .. import kernels
from ..kernels import reference
from ..kernels.spec import QuantSpec


def straight_through(grad: torch.Tensor, mask: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The STE backward: ``grad * mask``, or ``H (mask * (H grad))`` in fp32 with a rotation; grad's dtype."""
    if spec.hadamard_block:
        rotated = kernels.hadamard_rotate(grad.float(), spec.hadamard_block) * mask
        return kernels.hadamard_rotate(rotated, spec.hadamard_block).to(grad.dtype)
    return grad * mask


class FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, spec: QuantSpec, backend: str | None = None, global_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        q, mask = kernels.fake_quantize(x, spec, backend=backend, global_scale=global_scale)
        ctx.save_for_backward(mask)
        ctx.spec = spec
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return straight_through(grad, mask, ctx.spec), None, None, None


def fake_quantize_ste(
    x: torch.Tensor, spec: QuantSpec | None, backend: str | None = None, global_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``Q(x)`` with a straight-through gradient; identity when ``spec`` is None. ``backend`` and ``global_scale``
    (NVFP4) as in :func:`hf_cage.kernels.fake_quantize` (None: :func:`hf_cage.kernels.backend_for`)."""
    if spec is None:
        return x
    return FakeQuantSTE.apply(x, spec, backend, global_scale)


_fused = True


@contextlib.contextmanager
def fused_linear(enabled: bool):
    """Inside the block, :func:`quantized_linear` on the torch backend uses :class:`QuantizedLinearSTE` when
    ``enabled`` (the default outside), else :class:`FakeQuantSTE` on each operand and ``F.linear`` (tests and
    benchmarks compare the two)."""
    global _fused
    previous, _fused = _fused, enabled
    try:
        yield
    finally:
        _fused = previous


def _pack(codes: torch.Tensor, mask: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes with the trust mask folded in, ``code + 2^bits * mask`` (int8 while ``bits < 8``: a value above
    ``qmax`` carries the mask), else codes and the bool mask apart."""
    if spec.bits < 8:
        return codes + (mask.to(torch.int8) << spec.bits), None
    return codes, mask


def _unpack(packed: torch.Tensor, mask: torch.Tensor | None, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if mask is None:
        mask = packed > spec.qmax
        packed = packed - (mask.to(torch.int8) << spec.bits)
    return packed, mask


def _rotated_values(codes: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Q`` in the rotated basis, fp32: ``(code + code_offset) * scale``, the forward's values."""
    return reference.dequantize_rows(codes, scales, dataclasses.replace(spec, hadamard_block=None))


def _change_basis(t: torch.Tensor, have: int | None, want: int | None) -> torch.Tensor:
    """``t`` multiplied by ``H_have`` on its last dimension -> by ``H_want`` (nothing when the blocks agree)."""
    if have == want:
        return t
    if have:
        t = kernels.hadamard_rotate(t, have)
    return kernels.hadamard_rotate(t, want) if want else t


class QuantizedLinearSTE(torch.autograd.Function):
    """``F.linear(Qa(x), Qw(W), b)`` on the torch twins, forward bit for bit the unfused composition.

    Saves int8 codes (mask folded in) and fp32 scales per operand; the backward decodes ``Q`` in the rotated
    basis and computes ``H (mask * (g @ Qw H))``: equal to the unfused ``H (mask * H (g @ Qw))`` up to fp32
    summation order. Grids with integer codes only (``Grid.integer_codes``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight_spec: QuantSpec, activation_spec: QuantSpec | None):
        w_codes, w_scales, w_q, w_mask = reference.quantize_with_codes(weight, weight_spec)
        if activation_spec is None:
            x_q, x_saved, x_mask, x_scales = x, x, None, None
        else:
            x_codes, x_scales, x_q, x_mask = reference.quantize_with_codes(x, activation_spec)
            x_saved, x_mask = _pack(x_codes, x_mask, activation_spec)
        out = F.linear(x_q, w_q, bias)
        ctx.save_for_backward(x_saved, x_mask, x_scales, *_pack(w_codes, w_mask, weight_spec), w_scales)
        ctx.specs = (weight_spec, activation_spec)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_saved, x_mask, x_scales, w_packed, w_mask, w_scales = ctx.saved_tensors
        weight_spec, activation_spec = ctx.specs
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        w_block = weight_spec.hadamard_block
        a_block = activation_spec.hadamard_block if activation_spec else None
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        w_codes, w_mask = _unpack(w_packed, w_mask, weight_spec)
        w_rot = _rotated_values(w_codes, w_scales, weight_spec)  # Qw H_w
        if activation_spec is None:
            x_rot = x_saved.reshape(-1, x_saved.shape[-1])
        else:
            x_codes, x_mask = _unpack(x_saved, x_mask, activation_spec)
            x_rot = _rotated_values(x_codes, x_scales, activation_spec).reshape(-1, x_saved.shape[-1])  # Qa H_a
        # Matmuls in the output gradient's dtype (bf16 under autocast, like F.linear's backward there).
        if ctx.needs_input_grad[0]:
            gq = _change_basis((g @ w_rot.to(g.dtype)).float(), w_block, a_block)  # dL/dQa, times H_a
            if activation_spec is not None:
                x_mask_2d = x_mask.reshape(gq.shape)
                gq = kernels.hadamard_rotate(gq * x_mask_2d, a_block) if a_block else gq * x_mask_2d
            grad_x = gq.to(x_dtype).reshape(*grad.shape[:-1], -1)
        if ctx.needs_input_grad[1]:
            gw = _change_basis((g.T @ x_rot.to(g.dtype)).float(), a_block, w_block) * w_mask  # dL/dQw H_w, masked
            grad_w = (kernels.hadamard_rotate(gw, w_block) if w_block else gw).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None


def quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_spec: QuantSpec,
    activation_spec: QuantSpec | None,
    backend: str,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(Qa(x), Qw(W), b)`` with straight-through gradients (``activation_spec`` None: ``x`` as is).

    ``backend="torch"``, grids with integer codes (``Grid.integer_codes``) and autograd on:
    :class:`QuantizedLinearSTE`; otherwise :class:`FakeQuantSTE` on each operand (``global_scale``: NVFP4
    activations) and ``F.linear``. Same forward either way.
    """
    integer = weight_spec.quant_grid.integer_codes and (
        activation_spec is None or activation_spec.quant_grid.integer_codes
    )
    if _fused and backend == "torch" and integer and torch.is_grad_enabled():  # no_grad: nothing to save
        return QuantizedLinearSTE.apply(x, weight, bias, weight_spec, activation_spec)
    x = fake_quantize_ste(x, activation_spec, backend, global_scale)
    return F.linear(x, fake_quantize_ste(weight, weight_spec, backend), bias)

"""Straight-through fake quantization.

Forward returns ``Q(x)``; backward passes the gradient through unchanged where the value was
representable and zeroes it where it was clipped (QuEST's trust mask). With a Hadamard rotation
``H`` the mask lives in the rotated basis, so the gradient is ``H (mask * (H g))`` (``H`` is its
own inverse). :func:`straight_through` is that backward, the only one: :class:`FakeQuantSTE` and the
fused W4A4 layer function (:mod:`hf_cage.layers.qat_linear`) both call it.
"""

from __future__ import annotations

import torch

from .. import kernels
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

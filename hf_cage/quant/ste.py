"""Straight-through fake quantization.

Forward returns ``Q(x)``; backward passes the gradient through unchanged where the value was
representable and zeroes it where it was clipped (QuEST's trust mask). With a Hadamard rotation
``H`` the mask lives in the rotated basis, so the gradient is ``H (mask * (H g))`` (``H`` is its
own inverse).
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels.spec import QuantSpec


class FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        q, mask = kernels.fake_quantize(x, spec)
        ctx.save_for_backward(mask)
        ctx.spec = spec
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        block = ctx.spec.hadamard_block
        if block:
            rotated = kernels.hadamard_rotate(grad.float(), block) * mask
            return kernels.hadamard_rotate(rotated, block).to(grad.dtype), None
        return grad * mask, None


def fake_quantize_ste(x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """``Q(x)`` with a straight-through gradient; identity when ``spec`` is None."""
    if spec is None:
        return x
    return FakeQuantSTE.apply(x, spec)

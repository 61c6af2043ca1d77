"""How far a quantized model's weights are from their grid: the ``cage/*`` training metrics."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..qat import quantized_layers


@torch.no_grad()
def quantization_metrics(model: nn.Module) -> dict[str, float]:
    """``cage/quant_error``: mean over quantized weights of ``||W - Q(W)|| / ||W||``;
    ``cage/clip_fraction``: fraction of all quantized weight entries outside the clip range.

    One ``Q(W)`` per quantized layer: call it at logging steps, not every step.
    """
    errors, clipped, total = [], 0, 0
    for _, layer in quantized_layers(model):
        w = layer.weight.detach()
        q, mask = kernels.fake_quantize(w, layer.weight_spec)
        w32 = w.float()
        errors.append(((w32 - q.float()).norm() / w32.norm().clamp_min(1e-30)).item())
        clipped += int((~mask).sum())
        total += mask.numel()
    if not errors:
        return {}
    return {"cage/quant_error": sum(errors) / len(errors), "cage/clip_fraction": clipped / total}

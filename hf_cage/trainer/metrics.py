"""How far a quantized model's weights are from their grid: the ``cage/*`` training metrics."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..optim.correction import local_shard
from ..qat import quantized_layers


@torch.no_grad()
def layer_statistics(w: torch.Tensor, spec) -> torch.Tensor:
    """``[||W - Q(W)||^2, ||W||^2, clipped entries, entries]`` of one weight (shard), float64, on ``w``'s device."""
    if w.numel() == 0:
        return w.new_zeros(4, dtype=torch.float64)
    q, mask = kernels.fake_quantize(w, spec)
    w32 = w.float()
    error_sq = (w32 - q.float()).square().sum()
    norm_sq = w32.square().sum()
    clipped = (~mask).sum()
    entries = torch.tensor(mask.numel(), dtype=torch.float64, device=w.device)
    return torch.stack([error_sq, norm_sq, clipped, entries]).double()


@torch.no_grad()
def quantization_metrics(model: nn.Module) -> dict[str, float]:
    """``cage/quant_error``: mean over quantized layers of ``||W - Q(W)||_F / ||W||_F``;
    ``cage/clip_fraction``: fraction of all quantized weight entries outside the clip range (where the
    straight-through mask is off: ``|Q - W| > step / 2`` in the quantizer's basis).

    One ``Q(W)`` per quantized layer: call it at logging steps, not every step. Under FSDP2 each rank
    measures its row shards and the sums are all-reduced (every rank must call it, as ``Trainer.log`` does).
    """
    stats, sharded = [], False
    for _, layer in quantized_layers(model):
        weight = layer.weight.detach()
        w = local_shard(weight)
        sharded = sharded or w is not weight
        stats.append(layer_statistics(w, layer.weight_spec).cpu())
    if not stats:
        return {}
    totals = torch.stack(stats)
    if sharded:
        device = layer.weight.device
        totals = totals.to(device)
        torch.distributed.all_reduce(totals)
        totals = totals.cpu()
    errors = (totals[:, 0] / totals[:, 1].clamp_min(1e-60)).sqrt()
    return {
        "cage/quant_error": errors.mean().item(),
        "cage/clip_fraction": (totals[:, 2].sum() / totals[:, 3].sum()).item(),
    }

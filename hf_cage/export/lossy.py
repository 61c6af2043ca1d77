"""Measure a lossy conversion: re-quantizing trained ``Q(W)`` to a grid the target format can hold.

Used only when the user asks for it (``--allow-lossy``): each layer's trained, dequantized weight
``Q(W)`` (QuEST mid-rise grid, Hadamard rotation undone) is quantized again to the integer grid, and
the error is measured twice: relative weight error ``||W_int - Q(W)|| / ||Q(W)||`` over all layers,
and the logit difference on a sample batch with activations unquantized (so only the weights differ).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .. import kernels
from ..kernels.spec import QuantSpec


def requantize(trained_q: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scales, dequantized)`` of ``trained_q`` ``(out, in)`` on ``spec``'s grid (fp32)."""
    codes, scales = kernels.quantize_rows(trained_q.float(), spec)
    return codes, scales, kernels.dequantize_rows(codes, scales, spec)


@contextmanager
def _dense_weights(model: nn.Module, weights: dict[str, torch.Tensor]):
    """Temporarily replace the named quantized layers by plain linears holding ``weights``."""
    originals = {}
    try:
        for name, weight in weights.items():
            layer = model.get_submodule(name)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            dense = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
            dense.weight = nn.Parameter(weight.to(layer.weight.dtype), requires_grad=False)
            dense.bias = layer.bias
            originals[name] = (parent, child, layer)
            setattr(parent, child, dense)
        yield model
    finally:
        for parent, child, layer in originals.values():
            setattr(parent, child, layer)


@torch.no_grad()
def logit_difference(
    model: nn.Module, reference: dict[str, torch.Tensor], converted: dict[str, torch.Tensor], batch: torch.Tensor
) -> tuple[float, float]:
    """``(max, mean)`` absolute logit difference between the two sets of weights on ``batch`` ``(B, T)``."""
    with _dense_weights(model, reference):
        ref = model(input_ids=batch).logits.float()
    with _dense_weights(model, converted):
        out = model(input_ids=batch).logits.float()
    diff = (out - ref).abs()
    return diff.max().item(), diff.mean().item()


def sample_batch(model: nn.Module, batch_size: int = 2, seq_len: int = 32) -> torch.Tensor:
    """Seeded random token ids ``(batch_size, seq_len)`` within the model's vocabulary and context."""
    config = model.config
    seq_len = min(seq_len, getattr(config, "max_position_embeddings", seq_len))
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    return torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator).to(device)

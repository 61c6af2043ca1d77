"""Train/serve parity, measured: the trained QAT model against what an export's loader computes.

The served model is emulated in place: every quantized layer is temporarily replaced by a linear
holding the weight dequantized from the exported tensors and quantizing its inputs with the rule the
format's loader applies (compressed-tensors' dynamic rule, the trained rule for ``load_quantized``, or
none for a weights-only export), and every dense parameter is rounded through the exported dtype (a
loader computing in float32 upcasts what was stored). Both models then run the same seeded batch, the
trained one in its own dtype, the served one in the format's compute dtype (the model's, or bfloat16 for
the FP4 formats, which stock transformers decompresses into bf16), and the logits are compared.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels.spec import QuantSpec
from ..layers.packed import unpack_weight


class _ServedLinear(nn.Module):
    """``F.linear(Qa(x), W, b)`` with ``W`` dequantized from the exported tensors: a layer as a loader rebuilds it."""

    def __init__(self, packed: dict, weight_spec: QuantSpec, bias, activation_spec: QuantSpec | None):
        super().__init__()
        self.packed, self.weight_spec, self.activation_spec = packed, weight_spec, activation_spec
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = {k: v.to(x.device) for k, v in self.packed.items()}
        if self.activation_spec is not None:
            kwargs = {"global_scale": packed["input_global_scale"]} if "input_global_scale" in packed else {}
            x = kernels.fake_quantize(x, self.activation_spec, **kwargs)[0]
        weight = unpack_weight(packed, self.weight_spec, torch.float32).to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


ServedLayers = dict[str, tuple[dict, QuantSpec, "QuantSpec | None"]]


@contextmanager
def served_model(
    model: nn.Module, served: ServedLayers, dense_dtype: torch.dtype, compute_dtype: torch.dtype | None = None
):
    """Temporarily turn ``model`` into the served model.

    Args:
        served: quantized layer name -> (exported tensors of :func:`~hf_cage.layers.packed.pack_weight`
            plus the format's ``layer_tensors``, their weight grid, the activation grid the loader applies
            or ``None``).
        dense_dtype: dtype the dense tensors are stored in; parameters are rounded through it.
        compute_dtype: dtype the loader computes in (``None``: each parameter's own). Parameters are
            cast to it, buffers (rotary frequencies) are not, as ``from_pretrained(dtype=...)`` builds them.
    """
    swapped, rounded = [], []
    try:
        for name, (packed, weight_spec, activation_spec) in served.items():
            layer = model.get_submodule(name)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _ServedLinear(packed, weight_spec, layer.bias, activation_spec))
            swapped.append((parent, child, layer))
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dense_dtype:
                rounded.append((param, param.data))
                param.data = param.data.to(dense_dtype).to(compute_dtype or param.dtype)
            elif param.is_floating_point() and compute_dtype and param.dtype != compute_dtype:
                rounded.append((param, param.data))
                param.data = param.data.to(compute_dtype)
        yield model
    finally:
        for param, data in rounded:
            param.data = data
        for parent, child, layer in swapped:
            setattr(parent, child, layer)


def sample_batch(model: nn.Module, batch_size: int = 2, seq_len: int = 64) -> torch.Tensor:
    """Seeded random token ids ``(batch_size, seq_len)`` within the model's vocabulary and context."""
    config = model.config
    seq_len = min(seq_len, getattr(config, "max_position_embeddings", seq_len))
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    return torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator).to(device)


@torch.no_grad()
def measure_parity(
    model: nn.Module,
    served: ServedLayers,
    dense_dtype: torch.dtype,
    batch: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> dict:
    """``{"logit_max_abs_diff", "logit_mean_abs_diff", "logit_scale", "tokens", "compute_dtype"}`` between the
    trained model (in its own dtype) and the served model (in ``compute_dtype``, default the model's)."""
    batch = sample_batch(model) if batch is None else batch
    was_training = model.training
    model.eval()
    try:
        trained = model(input_ids=batch).logits.float()
        with served_model(model, served, dense_dtype, compute_dtype):
            out = model(input_ids=batch).logits.float()
    finally:
        model.train(was_training)
    diff = (out - trained).abs()
    return {
        "logit_max_abs_diff": diff.max().item(),
        "logit_mean_abs_diff": diff.mean().item(),
        "logit_scale": trained.abs().mean().item(),
        "tokens": batch.numel(),
        "compute_dtype": str(compute_dtype or next(model.parameters()).dtype).removeprefix("torch."),
    }

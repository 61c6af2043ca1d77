"""``create_cage_optimizer``: sort a quantized model's parameters into CAGE's param groups.

Groups, like transformers' own grouping plus one:

- ``cage_quantized``: the weights of ``QATLinear`` layers (correction + weight decay);
- ``decay``: other matrices (e.g. an untied ``lm_head``), weight decay only;
- ``no_decay``: norms, biases and embeddings.

Frozen parameters (``requires_grad=False``) are left out; empty groups are dropped.
"""

from __future__ import annotations

from torch import nn

from .cage import CAGE
from .correction import weight_quantizers_of

NO_DECAY_NAME_PATTERNS = ("bias", "norm")


def cage_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The three groups above as ``[{"params": [...], "weight_decay": ..., "name": ...}]``."""
    quantized = {id(p) for p in weight_quantizers_of(model)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups = {"cage_quantized": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lowered = name.lower()
        if id(p) in quantized:
            groups["cage_quantized"].append(p)
        elif p.ndim < 2 or id(p) in embeddings or any(pattern in lowered for pattern in NO_DECAY_NAME_PATTERNS):
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    decay = {"cage_quantized": weight_decay, "decay": weight_decay, "no_decay": 0.0}
    return [{"params": ps, "weight_decay": decay[name], "name": name} for name, ps in groups.items() if ps]


def create_cage_optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    **cage_kwargs,
) -> CAGE:
    """A :class:`CAGE` optimizer over ``model``'s trainable parameters, grouped as in the module docstring.

    ``cage_kwargs`` are any other :class:`CAGE` arguments (``betas``, ``eps``, ``cage_lambda``,
    ``cage_silence_ratio``, ``cage_schedule``, ``cage_variant``, ``total_steps``, ``foreach``, ...).

    Raises:
        ValueError: the model has no ``QATLinear`` layer (quantize it first with ``hf_cage.quantize_model``).
    """
    every_quantizer = weight_quantizers_of(model)
    if not every_quantizer:
        raise ValueError(
            "model has no QATLinear layers; quantize it first: hf_cage.quantize_model(model, hf_cage.QuantConfig())"
        )
    quantizers = {p: q for p, q in every_quantizer.items() if p.requires_grad}  # frozen weights are not stepped
    groups = cage_param_groups(model, weight_decay)
    return CAGE(groups, lr=lr, weight_decay=weight_decay, weight_quantizers=quantizers, **cage_kwargs)

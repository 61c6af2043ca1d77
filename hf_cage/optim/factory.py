"""``create_cage_optimizer`` and the one weight-decay policy of hf-cage.

Weight decay applies to the weights of the quantized block linears (the ``QATLinear`` layers) and to nothing else:
embeddings, ``lm_head`` (tied or not), norms and biases are not decayed, as in the CAGE reference.
:func:`decay_parameter_names` is that rule; ``create_cage_optimizer``, the trainer mixin and the recipes' BF16
baseline all use it. Frozen parameters are left out of the optimizer; empty groups are dropped.
"""

from __future__ import annotations

from torch import nn

from ..qat import quantized_layers, target_linears
from ..quant.config import QuantConfig
from .cage import CAGE


def decay_parameter_names(model: nn.Module, quant_config: QuantConfig | None = None) -> list[str]:
    """Names (as ``model.named_parameters()`` spells them) of the parameters that get weight decay.

    A quantized model: its ``QATLinear`` weights. A dense model with ``quant_config``: the weights of the
    linears :func:`hf_cage.quantize_model` would quantize with that config (so a BF16 baseline decays the
    same block linears as its QAT runs); a dense model without one: nothing.
    """
    layers = [layer for _, layer in quantized_layers(model)]
    if not layers and quant_config is not None:
        layers = [linear for _, linear in target_linears(model, quant_config)]
    decayed = {id(layer.weight) for layer in layers}
    return [name for name, p in model.named_parameters() if id(p) in decayed]


def cage_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """``[{"params", "weight_decay", "name"}]``: ``decay`` (quantized block linears) and ``no_decay`` (the rest)."""
    decay = set(decay_parameter_names(model))
    groups = {"decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups["decay" if name in decay else "no_decay"].append(p)
    rates = {"decay": weight_decay, "no_decay": 0.0}
    return [{"params": ps, "weight_decay": rates[name], "name": name} for name, ps in groups.items() if ps]


def create_cage_optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    **cage_kwargs,
) -> CAGE:
    """A :class:`CAGE` optimizer over ``model``'s trainable parameters, grouped by the decay policy above.

    ``cage_kwargs`` are any other :class:`CAGE` arguments (``betas``, ``eps``, ``cage_lambda``,
    ``cage_silence_ratio``, ``cage_schedule``, ``cage_variant``, ``total_steps``, ``foreach``, ``fused``).

    Raises:
        ValueError: the model has no ``QATLinear`` layer (quantize it first with ``hf_cage.quantize_model``).
    """
    if not any(True for _ in quantized_layers(model)):
        raise ValueError(
            "model has no QATLinear layers; quantize it first: hf_cage.quantize_model(model, hf_cage.QuantConfig())"
        )
    return CAGE(cage_param_groups(model, weight_decay), lr=lr, weight_decay=weight_decay, model=model, **cage_kwargs)

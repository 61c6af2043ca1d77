"""The decoupled CAGE post-step, as a wrapper around any torch optimizer.

After the wrapped optimizer's own step on the STE gradient, every quantized weight moves toward
its quantized value::

    W <- W - lr_t * lambda_t * (W - Q(W))        (computed as W.lerp_(Q(W), lr_t * lambda_t))

with ``Q`` the layer's ``QATLinear.weight_quantizer`` evaluated at the updated weight and ``lr_t``
the weight's param-group learning rate. With Adam this is CAGE's curvature-aware form; with SGD,
Adafactor or a user's optimizer it is the optimizer-agnostic form of CAGE.md section 2.

The weight -> quantizer mapping lives on the wrapper, never in the param groups (they hold plain
data, so ``state_dict()`` pickles). The schedule's step counter is a plain int ``cage_step`` kept in
every param group of the wrapped optimizer, so it travels with ``state_dict()`` and survives a
Trainer resume. The ``cage_*`` hyperparameters are the wrapper's own: loading a state dict never
changes them (resuming a checkpoint with a new ``cage_lambda`` branches the run with the new value).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..qat import quantized_layers
from .schedule import cage_lambda as scheduled_lambda
from .schedule import check_cage_hyperparameters

WeightQuantizer = Callable[[torch.Tensor], torch.Tensor]


def weight_quantizers_of(model: nn.Module) -> dict[nn.Parameter, WeightQuantizer]:
    """``{QATLinear.weight: QATLinear.weight_quantizer}`` for every quantized layer of ``model``."""
    return {layer.weight: layer.weight_quantizer for _, layer in quantized_layers(model)}


@torch.no_grad()
def pull_toward_quantized(
    params: Iterable[torch.Tensor], quantizers: Mapping[torch.Tensor, WeightQuantizer], weight: float
) -> int:
    """``W.lerp_(Q(W), weight)`` (= ``W - weight * (W - Q(W))``) for each param with a quantizer and a grad.

    Params without a gradient were not stepped by the optimizer and are left alone. Returns the
    number of weights moved (each one cost one call of its quantizer).
    """
    moved = 0
    for p in params:
        quantize = quantizers.get(p)
        if quantize is None or p.grad is None:
            continue
        p.lerp_(quantize(p), weight)
        moved += 1
    return moved


def _infer_step(optimizer: torch.optim.Optimizer, group: dict) -> int:
    """Optimizer steps already taken by ``group``, for a state dict saved without ``cage_step``."""
    steps = [optimizer.state.get(p, {}).get("step") for p in group["params"]]
    steps = [int(s) for s in steps if s is not None]
    return max(steps, default=0)


class CAGECorrection(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that each ``step()`` is followed by the decoupled CAGE correction.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        model: the quantized model (its ``QATLinear`` layers give the weights and their quantizers);
            or pass ``weight_quantizers`` instead.
        cage_lambda, cage_silence_ratio, cage_schedule, total_steps: the schedule (CAGE.md section 3);
            ``total_steps`` counts optimizer steps and may be set later (``wrapper.total_steps = n``).
        cage_variant: only ``"decoupled"`` (the coupled form needs Adam's moments: use ``hf_cage.CAGE``).

    Behaves like the wrapped optimizer (``param_groups``, ``state``, ``state_dict``, ``zero_grad``),
    so LR schedulers and ``transformers.Trainer`` accept it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None = None,
        *,
        weight_quantizers: Mapping[torch.Tensor, WeightQuantizer] | None = None,
        cage_lambda: float = 10.0,
        cage_silence_ratio: float = 0.8,
        cage_schedule: str = "linear_ramp",
        cage_variant: str = "decoupled",
        total_steps: int | None = None,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        later = 1 if total_steps is None else total_steps  # total_steps may be filled in later
        if cage_variant != "decoupled":
            check_cage_hyperparameters(cage_lambda, cage_silence_ratio, cage_schedule, cage_variant, later)
            raise ValueError(
                f"cage_variant={cage_variant!r}: CAGECorrection only implements the 'decoupled' variant; "
                "use hf_cage.CAGE for the coupled one"
            )
        if (model is None) == (weight_quantizers is None):
            raise ValueError("pass exactly one of model= (a quantized model) or weight_quantizers=")
        self.optimizer = optimizer
        quantizers = weight_quantizers if model is None else weight_quantizers_of(model)
        self.weight_quantizers = {p: q for p, q in quantizers.items() if p.requires_grad}
        self.cage_lambda = cage_lambda
        self.cage_silence_ratio = cage_silence_ratio
        self.cage_schedule = cage_schedule
        self.cage_variant = cage_variant
        self.total_steps = total_steps
        check_cage_hyperparameters(cage_lambda, cage_silence_ratio, cage_schedule, cage_variant, later)
        in_optimizer = {p for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.weight_quantizers if p not in in_optimizer]
        if missing:
            raise ValueError(
                f"{len(missing)} quantized weights are not in the optimizer's param groups; build the optimizer "
                "on the quantized model's parameters (quantize_model shares them with the dense model)"
            )
        for group in optimizer.param_groups:
            group.setdefault("cage_step", 0)

    # Delegation, as accelerate's AcceleratedOptimizer does.
    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state):
        self.optimizer.state = state

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, param_groups):
        self.optimizer.param_groups = param_groups

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults):
        self.optimizer.defaults = defaults

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("cage_step", 0)
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the wrapped optimizer's state; ``cage_step`` comes back from it, the ``cage_*`` settings stay."""
        self.optimizer.load_state_dict(state_dict)
        for group in self.optimizer.param_groups:
            if "cage_step" not in group:
                group["cage_step"] = _infer_step(self.optimizer, group)

    def __repr__(self) -> str:
        return (
            f"CAGECorrection(cage_lambda={self.cage_lambda}, cage_silence_ratio={self.cage_silence_ratio}, "
            f"cage_schedule={self.cage_schedule!r}, total_steps={self.total_steps}, optimizer={self.optimizer!r})"
        )

    def lambda_at(self, step: int) -> float:
        """``lambda_t`` at optimizer step ``step`` (1-based)."""
        return scheduled_lambda(step, self.total_steps, self.cage_lambda, self.cage_silence_ratio, self.cage_schedule)

    def next_lambda(self) -> float:
        """The ``lambda_t`` the next ``step()`` applies."""
        return self.lambda_at(self.optimizer.param_groups[0]["cage_step"] + 1)

    def step(self, closure=None):
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        for group in self.optimizer.param_groups:
            group["cage_step"] += 1
            lam = self.lambda_at(group["cage_step"])
            if lam:
                pull_toward_quantized(group["params"], self.weight_quantizers, float(group["lr"]) * lam)
        return loss

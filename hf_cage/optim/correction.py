"""The CAGE correction: one implementation, attached to any torch optimizer through its public hooks.

For every trainable quantized weight ``W`` (a ``QATLinear``'s weight, ``Q`` its ``weight_quantizer``) and the
``lambda_t`` of :mod:`hf_cage.optim.schedule` (docs/method.md gives the method):

- ``decoupled`` (default): after the optimizer's own step, ``W <- W - lr_t * lambda_t * (W - Q(W))``
  (``W.lerp_(Q(W), lr_t * lambda_t)``), ``Q`` at the updated weight, ``lr_t`` the LR of ``W``'s param group;
- ``coupled``: before the step, ``grad += lambda_t * (W - Q(W))``; ``step(closure)`` is refused, since the closure
  would recompute the gradients after the term was added.

It hooks ``register_step_pre_hook``, ``register_step_post_hook`` and ``register_load_state_dict_post_hook``; the
optimizer is stepped as before. The counter ``cage_step`` (steps of this run) and ``cage_pull`` (the realised
``sum_t lr_t * lambda_t``) are plain numbers in every param group, so they travel with ``state_dict()`` and survive
a resume; the hyperparameters belong to the correction and are never read from a state dict. A step GradScaler
skips runs no correction (for a fused optimizer: ``found_inf`` set), and the coupled term is multiplied by
``grad_scale`` like the gradient it joins. FSDP2: ``Q`` acts per row, which a row shard holds whole, so the
correction runs on each local shard.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from ..qat import quantized_layers
from .defaults import CAGE_LAMBDA, CAGE_SCHEDULE, CAGE_SILENCE_RATIO, CAGE_VARIANT
from .schedule import cage_lambda as scheduled_lambda
from .schedule import check_cage_hyperparameters

WeightQuantizer = Callable[[torch.Tensor], torch.Tensor]

_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weight_quantizers_of(model: nn.Module) -> dict[nn.Parameter, WeightQuantizer]:
    """``{QATLinear.weight: QATLinear.weight_quantizer}`` for every quantized layer of ``model``."""
    return {layer.weight: layer.weight_quantizer for _, layer in quantized_layers(model)}


def cage_correction_of(optimizer) -> CAGECorrection | None:
    """The correction attached to ``optimizer`` (or to the optimizer a wrapper such as accelerate's holds)."""
    seen = 0
    while optimizer is not None and seen < 8:
        found = _ATTACHED.get(optimizer) if isinstance(optimizer, torch.optim.Optimizer) else None
        if found is not None:
            return found
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor (shares its storage), or ``t`` itself."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            return t.to_local()
    return t


def _skipped_by_grad_scaler(optimizer: torch.optim.Optimizer) -> bool:
    """True when GradScaler marked this (fused) step as overflowed: the optimizer skips it internally."""
    found_inf = getattr(optimizer, "found_inf", None)
    return found_inf is not None and bool(found_inf.item())


class CAGECorrection:
    """Attach the CAGE correction to ``optimizer`` (see the module docstring).

    Args:
        optimizer: any ``torch.optim.Optimizer`` holding the quantized weights, or a wrapper that holds one as its
            public ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, what a ``TrainerCallback`` receives): the
            correction attaches to the optimizer inside.
        model: the quantized model; its ``QATLinear`` layers give the weights and ``Q``, looked up at every step
            (so the parameters accelerate swaps in when it shards the model are found). Or pass
            ``weight_quantizers`` (``{weight: Q}``, fixed) instead.
        cage_lambda, cage_silence_ratio, cage_schedule, total_steps: the schedule (:mod:`hf_cage.optim.schedule`);
            ``total_steps`` counts optimizer steps and may be given later with :meth:`start_run`.
        cage_variant: ``"decoupled"`` or ``"coupled"``.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
        ValueError: a hyperparameter is out of range, both or neither of ``model`` / ``weight_quantizers``, the
            optimizer already has a correction, a quantized weight is missing from its param groups, or
            ``cage_lambda > 0`` with no quantized weight.

    Warns when the quantized weights are not fp32 (the pull rounds away in bf16). Frozen weights and weights
    without a gradient are left alone. :meth:`remove` detaches the hooks.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None = None,
        *,
        weight_quantizers: Mapping[torch.Tensor, WeightQuantizer] | None = None,
        cage_lambda: float = CAGE_LAMBDA,
        cage_silence_ratio: float = CAGE_SILENCE_RATIO,
        cage_schedule: str = CAGE_SCHEDULE,
        cage_variant: str = CAGE_VARIANT,
        total_steps: int | None = None,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"the CAGE correction attaches to a torch.optim.Optimizer (through its step hooks), got "
                f"{type(optimizer).__name__}"
            )
        while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.optimizer  # a wrapper (accelerate's AcceleratedOptimizer) steps the one it holds
        check_cage_hyperparameters(
            cage_lambda, cage_silence_ratio, cage_schedule, cage_variant, 1 if total_steps is None else total_steps
        )
        if (model is None) == (weight_quantizers is None):
            raise ValueError("pass exactly one of model= (a quantized model) or weight_quantizers=")
        if cage_correction_of(optimizer) is not None:
            raise ValueError("this optimizer already has a CAGE correction attached")
        self.optimizer = optimizer
        self.model = model
        self._fixed_quantizers = None if weight_quantizers is None else dict(weight_quantizers)
        self.cage_lambda = float(cage_lambda)
        self.cage_silence_ratio = float(cage_silence_ratio)
        self.cage_schedule = cage_schedule
        self.cage_variant = cage_variant
        self.total_steps = total_steps
        quantizers = self.weight_quantizers
        in_optimizer = {p for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in quantizers if p not in in_optimizer]
        if missing:
            raise ValueError(
                f"{len(missing)} trainable quantized weights are not in the optimizer's param groups; build the "
                "optimizer on the quantized model's parameters (quantize_model shares them with the dense model)"
            )
        self._check_targets(quantizers)
        low = sorted({str(p.dtype) for p in quantizers if p.dtype not in (torch.float32, torch.float64)})
        if low and self.cage_lambda > 0:
            warnings.warn(
                f"the quantized weights are stored in {', '.join(low)}: the CAGE pull lr*lambda*(W - Q(W)) is below "
                "that format's resolution for most entries and rounds away; keep fp32 master weights (load the "
                "model in float32 and train with bf16 autocast)",
                stacklevel=2,
            )
        for group in optimizer.param_groups:
            group.setdefault("cage_step", 0)
            group.setdefault("cage_pull", 0.0)
        self._lambda_of_step = 0.0
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
            optimizer.register_load_state_dict_post_hook(self._after_load),
        ]
        _ATTACHED[optimizer] = self

    def __repr__(self) -> str:
        return (
            f"CAGECorrection(cage_lambda={self.cage_lambda}, cage_silence_ratio={self.cage_silence_ratio}, "
            f"cage_schedule={self.cage_schedule!r}, cage_variant={self.cage_variant!r}, "
            f"total_steps={self.total_steps}, optimizer={type(self.optimizer).__name__})"
        )

    @property
    def weight_quantizers(self) -> dict[torch.Tensor, WeightQuantizer]:
        """``{weight: Q}`` of the trainable quantized weights, as the model holds them now."""
        quantizers = weight_quantizers_of(self.model) if self._fixed_quantizers is None else self._fixed_quantizers
        return {p: q for p, q in quantizers.items() if p.requires_grad}

    def _check_targets(self, quantizers) -> None:
        if self.cage_lambda > 0 and not quantizers:
            raise ValueError(
                "cage_lambda > 0 but the optimizer holds no trainable quantized weight: quantize the model first "
                "(hf_cage.quantize_model) and build the optimizer with hf_cage.create_cage_optimizer(model, ...) or "
                "pass model=; or set cage_lambda=0 for plain STE training"
            )

    @property
    def pull_realised(self) -> float:
        """``sum_t lr_t * lambda_t`` over the steps taken so far in this run (a resumed run counts from its
        checkpoint's value), for the param group holding the quantized weights (the largest, if several)."""
        targets = {id(p) for p in self.weight_quantizers}
        pulls = [
            float(g.get("cage_pull", 0.0))
            for g in self.optimizer.param_groups
            if any(id(p) in targets for p in g["params"])
        ]
        return max(pulls, default=0.0)

    @property
    def steps_taken(self) -> int:
        """Optimizer steps taken in this run (the schedule's ``t`` of the last step)."""
        return max((int(g.get("cage_step", 0)) for g in self.optimizer.param_groups), default=0)

    def start_run(self, total_steps: int | None) -> None:
        """Begin a run of ``total_steps`` optimizer steps: set the schedule's length, restart the counter and the
        realised pull at 0. Set ``cage_lambda`` before calling it to change the strength for the run."""
        check_cage_hyperparameters(
            self.cage_lambda, self.cage_silence_ratio, self.cage_schedule, self.cage_variant, total_steps
        )
        self._check_targets(self.weight_quantizers)
        self.total_steps = total_steps
        for group in self.optimizer.param_groups:
            group["cage_step"] = 0
            group["cage_pull"] = 0.0

    def lambda_at(self, step: int) -> float:
        """``lambda_t`` at optimizer step ``step`` (1-based)."""
        return scheduled_lambda(step, self.total_steps, self.cage_lambda, self.cage_silence_ratio, self.cage_schedule)

    def next_lambda(self) -> float:
        """The ``lambda_t`` the next ``step()`` applies."""
        return self.lambda_at(self.steps_taken + 1)

    def remove(self) -> None:
        """Detach the hooks; the optimizer is plain again."""
        for handle in self._handles:
            handle.remove()
        _ATTACHED.pop(self.optimizer, None)

    def _targets(self, params) -> Iterator[tuple[torch.Tensor, WeightQuantizer]]:
        quantizers = self.weight_quantizers
        for p in params:
            quantize = quantizers.get(p)
            if quantize is not None and p.grad is not None:
                yield p, quantize

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        self._lambda_of_step = lam = self.next_lambda()
        if not lam or self.cage_variant != "coupled" or _skipped_by_grad_scaler(optimizer):
            return
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # torch passes step's args with self first
        if closure is not None:
            raise ValueError(
                "the coupled CAGE variant adds to the gradients before the step, but a closure recomputes them inside "
                "step(): call backward() before step() without a closure, or use cage_variant='decoupled'"
            )
        grad_scale = getattr(optimizer, "grad_scale", None)  # set by GradScaler on fused optimizers only
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for p, quantize in self._targets(params):
            w, g = local_shard(p), local_shard(p.grad)
            if w.numel() == 0:
                continue
            error = w - quantize(w)
            if grad_scale is not None:
                error.mul_(grad_scale.to(error.dtype))
            g.add_(error.to(g.dtype), alpha=lam)

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        if _skipped_by_grad_scaler(optimizer):
            return
        step = self.steps_taken + 1
        lam = self._lambda_of_step
        for group in optimizer.param_groups:
            group["cage_step"] = step
            if lam:
                group["cage_pull"] = float(group.get("cage_pull", 0.0)) + float(group["lr"]) * lam
            if lam and self.cage_variant == "decoupled":
                weight = float(group["lr"]) * lam
                for p, quantize in self._targets(group["params"]):
                    w = local_shard(p)
                    if w.numel():
                        w.lerp_(quantize(w), weight)

    def _after_load(self, optimizer) -> None:
        """A state dict saved without ``cage_step`` (plain AdamW): infer it from Adam's per-parameter steps; without
        ``cage_pull``: 0 (no correction was applied by what saved it)."""
        for group in optimizer.param_groups:
            group.setdefault("cage_pull", 0.0)
            if "cage_step" not in group:
                steps = [optimizer.state.get(p, {}).get("step") for p in group["params"]]
                group["cage_step"] = max((int(s) for s in steps if s is not None), default=0)

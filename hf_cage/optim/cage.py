"""``CAGE``: AdamW with the CAGE correction fused into its step (CAGE.md section 2).

One ``step()``:

1. ``lambda_t`` from the group's schedule (:func:`hf_cage.optim.schedule.cage_lambda`), with ``t``
   the group's ``cage_step + 1``;
2. coupled variant only: ``grad += lambda_t * (W - Q(W))`` for each quantized weight (this
   changes ``p.grad`` in place, before the moments see it);
3. the ordinary AdamW update on every parameter (torch's own implementation: ``foreach`` /
   ``fused`` / single-tensor, exactly as ``torch.optim.AdamW``);
4. decoupled variant (default): ``W <- W - lr_t * lambda_t * (W - Q(W))`` with ``Q`` taken at the
   updated weight, for each quantized weight.

While ``lambda_t == 0`` (the silence period, or ``cage_lambda=0``: the STE baseline) steps 2 and 4
are skipped entirely, so ``Q`` is never called and the step costs what AdamW's does.

Which weights are quantized: the keys of ``weight_quantizers`` (weight -> ``QATLinear.weight_quantizer``),
kept on the optimizer, not in the param groups, so ``state_dict()`` holds plain data only.
:func:`hf_cage.create_cage_optimizer` fills it from the model.

Resume semantics: ``state_dict()`` carries the moments, Adam's per-parameter steps and the schedule
counter ``cage_step`` of each group; ``load_state_dict`` restores all of them, but keeps the ``cage_*``
hyperparameters and ``total_steps`` this optimizer was built with (torch would overwrite them with the
saved ones). So resuming an STE checkpoint with ``cage_lambda=10`` branches a CAGE run from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .correction import WeightQuantizer, _infer_step, pull_toward_quantized
from .schedule import cage_lambda as scheduled_lambda
from .schedule import check_cage_hyperparameters

CAGE_HYPERPARAMETERS = ("cage_lambda", "cage_silence_ratio", "cage_schedule", "cage_variant", "total_steps")


def _raw_adam_step():
    """``torch.optim.Adam.step`` without the profiling/hook wrapper torch patches onto the class.

    Calling ``super().step()`` could run the step hooks twice when torch has patched ``AdamW.step``;
    ``CAGE.step`` is itself hooked, once.
    """
    fn = torch.optim.Adam.__dict__["step"]
    while getattr(fn, "hooked", False):
        fn = fn.__wrapped__
    return fn


_ADAM_STEP = _raw_adam_step()


class CAGE(torch.optim.AdamW):
    """AdamW + CAGE. See the module docstring for the update and the resume semantics.

    Args:
        params: parameters or param groups (groups may override any hyperparameter below).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (CAGE's defaults: betas (0.9, 0.95),
            no weight decay).
        cage_lambda: correction strength; 0 = the STE / QuEST baseline (CAGE.md: 10).
        cage_silence_ratio: fraction of ``total_steps`` before the correction starts, in [0, 1).
        cage_schedule: ``"linear_ramp"`` or ``"constant"``.
        cage_variant: ``"decoupled"`` (post-step) or ``"coupled"`` (added to the gradient).
        total_steps: optimizer steps in the run; required when ``cage_lambda > 0``.
        weight_quantizers: ``{weight: Q}`` for the quantized weights (``hf_cage.optim.weight_quantizers_of``).
        foreach, fused: passed to ``torch.optim.AdamW``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        cage_lambda: float = 10.0,
        cage_silence_ratio: float = 0.8,
        cage_schedule: str = "linear_ramp",
        cage_variant: str = "decoupled",
        total_steps: int | None = None,
        *,
        weight_quantizers: Mapping[torch.Tensor, WeightQuantizer] | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        self._cage_defaults = {
            "cage_lambda": cage_lambda,
            "cage_silence_ratio": cage_silence_ratio,
            "cage_schedule": cage_schedule,
            "cage_variant": cage_variant,
            "total_steps": total_steps,
        }
        self.weight_quantizers = dict(weight_quantizers or {})
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused)
        self.defaults.update(self._cage_defaults)
        in_optimizer = {p for group in self.param_groups for p in group["params"]}
        missing = [p for p in self.weight_quantizers if p not in in_optimizer]
        if missing:
            raise ValueError(f"{len(missing)} weights in weight_quantizers are not among the optimizer's params")
        if not self.weight_quantizers and any(g["cage_lambda"] > 0 for g in self.param_groups):
            raise ValueError(
                "cage_lambda > 0 but no quantized weights were given: build the optimizer with "
                "hf_cage.create_cage_optimizer(model, ...) or pass "
                "weight_quantizers=hf_cage.weight_quantizers_of(model) (or set cage_lambda=0 for plain AdamW / STE)"
            )

    def add_param_group(self, param_group: dict) -> None:
        for key, value in self._cage_defaults.items():
            param_group.setdefault(key, value)
        check_cage_hyperparameters(*(param_group[key] for key in CAGE_HYPERPARAMETERS))
        param_group.setdefault("cage_step", 0)
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore moments and step counters; keep this optimizer's ``cage_*`` hyperparameters and ``total_steps``."""
        kept = [{key: group[key] for key in CAGE_HYPERPARAMETERS} for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, values in zip(self.param_groups, kept):
            group.update(values)
            if "cage_step" not in group:
                group["cage_step"] = _infer_step(self, group)

    def lambda_at(self, step: int, group: dict | None = None) -> float:
        """``lambda_t`` of ``group`` (default: the first group) at optimizer step ``step`` (1-based)."""
        group = self.param_groups[0] if group is None else group
        return scheduled_lambda(
            step, group["total_steps"], group["cage_lambda"], group["cage_silence_ratio"], group["cage_schedule"]
        )

    def next_lambda(self) -> float:
        """The ``lambda_t`` the next ``step()`` applies to the quantized weights (first group holding one)."""
        for group in self.param_groups:
            if any(p in self.weight_quantizers for p in group["params"]):
                return self.lambda_at(group["cage_step"] + 1, group)
        return 0.0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lambdas = [self.lambda_at(group["cage_step"] + 1, group) for group in self.param_groups]
        for group, lam in zip(self.param_groups, lambdas):
            if lam and group["cage_variant"] == "coupled":
                for p in group["params"]:
                    quantize = self.weight_quantizers.get(p)
                    if quantize is not None and p.grad is not None:
                        p.grad.add_(p - quantize(p), alpha=lam)
        _ADAM_STEP(self)
        for group, lam in zip(self.param_groups, lambdas):
            group["cage_step"] += 1
            if lam and group["cage_variant"] == "decoupled":
                pull_toward_quantized(group["params"], self.weight_quantizers, float(group["lr"]) * lam)
        return loss

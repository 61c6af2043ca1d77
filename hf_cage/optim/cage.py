"""``CAGE``: ``torch.optim.AdamW`` with the CAGE correction attached to itself (docs/method.md, "The update").

The AdamW update is torch's own (``foreach`` / ``fused`` / single-tensor); the correction, its schedule and its
state are :class:`hf_cage.optim.correction.CAGECorrection`, the same code that attaches CAGE to any optimizer.
While ``lambda_t == 0`` (the silence period, or ``cage_lambda=0``: the STE baseline) ``Q`` is never called and the
step is AdamW's, bit for bit. ``load_state_dict`` restores the moments and ``cage_step`` and keeps this optimizer's
``cage_*`` settings and ``total_steps``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .correction import CAGECorrection, WeightQuantizer
from .defaults import CAGE_LAMBDA, CAGE_SCHEDULE, CAGE_SILENCE_RATIO, CAGE_VARIANT


class CAGE(torch.optim.AdamW):
    """AdamW + CAGE: each ``step()`` is the coupled term (if any), AdamW's update, then the decoupled pull.

    Args:
        params: parameters or param groups (groups may override ``lr``, ``betas``, ``weight_decay``, ...).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (CAGE's defaults: betas (0.9, 0.95),
            no weight decay).
        cage_lambda: correction strength; 0 = the STE / QuEST baseline (default: ``optim.defaults``).
        cage_silence_ratio: fraction of ``total_steps`` before the correction starts, in [0, 1).
        cage_schedule: ``"linear_ramp"`` or ``"constant"``.
        cage_variant: ``"decoupled"`` (post-step) or ``"coupled"`` (added to the gradient).
        total_steps: optimizer steps in the run; needed by the first step with ``cage_lambda > 0``.
        model: the quantized model (its ``QATLinear`` layers give the weights and ``Q``), or
        weight_quantizers: ``{weight: Q}`` (``hf_cage.weight_quantizers_of(model)``).
        foreach, fused: passed to ``torch.optim.AdamW``.

    ``self.correction`` is the attached :class:`CAGECorrection` (schedule, ``start_run``, ``next_lambda``).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        cage_lambda: float = CAGE_LAMBDA,
        cage_silence_ratio: float = CAGE_SILENCE_RATIO,
        cage_schedule: str = CAGE_SCHEDULE,
        cage_variant: str = CAGE_VARIANT,
        total_steps: int | None = None,
        *,
        model: nn.Module | None = None,
        weight_quantizers: Mapping[torch.Tensor, WeightQuantizer] | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused)
        if model is None and weight_quantizers is None:
            weight_quantizers = {}
        self.correction = CAGECorrection(
            self,
            model,
            weight_quantizers=weight_quantizers,
            cage_lambda=cage_lambda,
            cage_silence_ratio=cage_silence_ratio,
            cage_schedule=cage_schedule,
            cage_variant=cage_variant,
            total_steps=total_steps,
        )

    def lambda_at(self, step: int) -> float:
        """``lambda_t`` at optimizer step ``step`` (1-based)."""
        return self.correction.lambda_at(step)

    def next_lambda(self) -> float:
        """The ``lambda_t`` the next ``step()`` applies."""
        return self.correction.next_lambda()

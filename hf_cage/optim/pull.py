"""``cage_pull``: the correction's strength as the total pull ``sum_t lr_t * lambda_t`` of a run.

The decoupled step moves each quantized weight by ``lr_t * lambda_t`` of its distance to the grid, so that sum, not
``lambda`` alone, sets how far CAGE pulls (docs/method.md, "The total pull"). :func:`lambda_for_pull` returns the
``cage_lambda`` whose schedule realises a requested pull over the run's learning rates ``lr_1 .. lr_T``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .schedule import cage_lambda


def check_cage_pull(pull: float) -> None:
    """Raise ``ValueError`` unless ``pull`` is a number >= 0."""
    if not isinstance(pull, (int, float)) or isinstance(pull, bool) or not pull >= 0:
        raise ValueError(f"cage_pull={pull!r} must be a number >= 0 (0 = the STE baseline)")


def total_pull(learning_rates: Sequence[float], lam: float, silence_ratio: float, schedule: str) -> float:
    """``sum_t lr_t * lambda_t`` over ``t = 1 .. len(learning_rates)``, ``lambda_t`` from hf-cage's schedule."""
    total = len(learning_rates)
    return sum(lr * cage_lambda(t, total, lam, silence_ratio, schedule) for t, lr in enumerate(learning_rates, 1))


def lambda_for_pull(pull: float, learning_rates: Sequence[float], silence_ratio: float, schedule: str) -> float:
    """The ``cage_lambda`` with ``total_pull(learning_rates, lambda, ...) == pull`` (lambda_t is linear in lambda).

    Raises:
        ValueError: ``pull`` < 0, or ``pull`` > 0 while ``lr_t * lambda_t`` is 0 at every step of the run.
    """
    check_cage_pull(pull)
    if pull == 0:
        return 0.0
    unit = total_pull(learning_rates, 1.0, silence_ratio, schedule)
    if not unit > 0:
        raise ValueError(
            f"cage_pull={pull:g} cannot be reached: the learning rate times the lambda schedule is 0 at every one of "
            f"the run's {len(learning_rates)} steps (silence ratio {silence_ratio:g}); train more steps or lower "
            "cage_silence_ratio"
        )
    return pull / unit


def scheduled_learning_rates(scheduler, params: Iterable[torch.Tensor], total_steps: int) -> list[float]:
    """``lr_t`` for the optimizer steps ``t = 1 .. total_steps`` of the param groups holding ``params``.

    ``scheduler`` is a ``torch.optim.lr_scheduler.LambdaLR`` (every transformers ``lr_scheduler_type`` but
    ``reduce_lr_on_plateau``): step ``t`` runs at ``base_lr * lr_lambda(t - 1)``, as the
    Trainer steps the scheduler after the optimizer. The learning rates of the whole run, whatever step a
    resumed run starts from.

    Raises:
        ValueError: another kind of scheduler (its LRs are not known ahead), no group holds ``params``, or the
            groups holding them follow different schedules.
    """
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler holds it publicly
    if not isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
        raise ValueError(
            f"cage_pull needs the learning rate of every step ahead of the run, which a {type(inner).__name__} does "
            "not give; use a LambdaLR scheduler (every lr_scheduler_type but reduce_lr_on_plateau) or set cage_lambda"
        )
    wanted = {id(p) for p in params}
    groups = [i for i, g in enumerate(inner.optimizer.param_groups) if any(id(p) in wanted for p in g["params"])]
    if not groups:
        raise ValueError("cage_pull: no param group of the optimizer holds a quantized weight")
    schedules = {tuple(inner.base_lrs[i] * inner.lr_lambdas[i](t) for t in range(total_steps)) for i in groups}
    if len(schedules) > 1:
        raise ValueError(
            "cage_pull: the quantized weights sit in param groups with different learning rates, so one lambda "
            "cannot give each the requested pull; give them one learning rate or set cage_lambda"
        )
    return list(schedules.pop())

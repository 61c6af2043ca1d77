"""The CAGE lambda schedule (docs/method.md, "Lambda schedule") and the checks every CAGE entry point shares.

With optimizer step ``t`` (1-based), ``T`` total steps, progress ``r = t / T``, strength ``lambda``
and silence ratio ``s``:

- ``linear_ramp`` (default): ``0`` while ``r <= s``, then ``lambda * min(1, (r - s) / (1 - s))``;
- ``constant``: ``lambda`` once ``r > s``, else ``0``.

The first ``s * T`` steps are the *silence period*: the correction is zero there, and CAGE never
computes ``Q(W)`` during it. ``lambda = 0`` makes every step silent: plain STE / QuEST training.
"""

from __future__ import annotations

from .defaults import CAGE_LAMBDA, CAGE_SILENCE_RATIO

SCHEDULES = ("linear_ramp", "constant")
VARIANTS = ("decoupled", "coupled")


def check_cage_hyperparameters(
    cage_lambda: float,
    cage_silence_ratio: float,
    cage_schedule: str,
    cage_variant: str = "decoupled",
    total_steps: int | None = None,
) -> None:
    """Raise ``ValueError`` naming the field when a CAGE hyperparameter is out of range."""
    if not isinstance(cage_lambda, (int, float)) or isinstance(cage_lambda, bool) or not cage_lambda >= 0:
        raise ValueError(
            f"cage_lambda={cage_lambda!r} must be a number >= 0 (0 = the STE baseline; CAGE uses ~{CAGE_LAMBDA:g})"
        )
    if not isinstance(cage_silence_ratio, (int, float)) or not 0 <= cage_silence_ratio < 1:
        raise ValueError(
            f"cage_silence_ratio={cage_silence_ratio!r} must lie in [0, 1): the fraction of steps before the "
            f"correction starts (CAGE uses {CAGE_SILENCE_RATIO:g})"
        )
    if cage_schedule not in SCHEDULES:
        raise ValueError(f"cage_schedule={cage_schedule!r} is not supported; allowed values: {', '.join(SCHEDULES)}")
    if cage_variant not in VARIANTS:
        raise ValueError(f"cage_variant={cage_variant!r} is not supported; allowed values: {', '.join(VARIANTS)}")
    if total_steps is not None and (
        isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
    ):
        raise ValueError(f"total_steps={total_steps!r} must be a positive int (the number of optimizer steps)")
    if total_steps is None and cage_lambda > 0 and not (cage_schedule == "constant" and cage_silence_ratio == 0):
        raise ValueError(
            f"total_steps is required when cage_lambda={cage_lambda} > 0: the {cage_schedule!r} schedule is a "
            "fraction of the run; pass total_steps=<number of optimizer steps> (CAGETrainer sets it for you)"
        )


def cage_lambda(step: int, total_steps: int | None, cage_lambda: float, silence_ratio: float, schedule: str) -> float:
    """``lambda_t`` for optimizer step ``step`` (1-based) of ``total_steps``; see the module docstring.

    Past ``total_steps`` the schedule stays at its end value ``cage_lambda``. ``total_steps`` may be
    ``None`` only for the ``constant`` schedule with no silence.
    """
    if step < 1:
        raise ValueError(f"step={step} must be >= 1 (optimizer steps are counted from 1)")
    if schedule not in SCHEDULES:
        raise ValueError(f"cage_schedule={schedule!r} is not supported; allowed values: {', '.join(SCHEDULES)}")
    if cage_lambda == 0:
        return 0.0
    if total_steps is None:
        if schedule == "constant" and silence_ratio == 0:
            return float(cage_lambda)
        raise ValueError("total_steps is required for this schedule; pass the number of optimizer steps")
    progress = step / total_steps
    if progress <= silence_ratio:
        return 0.0
    if schedule == "constant":
        return float(cage_lambda)
    return float(cage_lambda) * min(1.0, (progress - silence_ratio) / (1.0 - silence_ratio))

"""Training a run through the product: ``fake_quantize_ste``, a torch optimizer with the presets' schedule, and
``hf_cage.CAGECorrection`` (none for STE)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict

from .grid import best_points
from .problems import CURVE_POINTS, Run, objective, problem, weight_spec


def make_scheduler(optimizer, steps: int):
    """The presets' LR schedule: transformers' ``cosine_with_min_lr``, 10% warmup, cosine to 10% of the peak."""
    from transformers import get_scheduler

    return get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        num_warmup_steps=math.ceil(0.1 * steps),
        num_training_steps=steps,
        scheduler_specific_kwargs={"min_lr_rate": 0.1},
    )


def pull_per_lambda(steps: int, lr: float, silence: float) -> float:
    """``sum_t lr_t * lambda_t / lambda``: the total pull a run of this schedule gets per unit of lambda."""
    import torch

    from hf_cage.optim.pull import scheduled_learning_rates, total_pull

    param = torch.zeros(1, requires_grad=True)
    sched = make_scheduler(torch.optim.SGD([param], lr=lr), steps)
    return total_pull(scheduled_learning_rates(sched, [param], steps), 1.0, silence, "linear_ramp")


def lambda_for(run: Run) -> float:
    """The ``cage_lambda`` that gives ``run`` its total pull."""
    return 0.0 if run.variant == "ste" else run.pull / pull_per_lambda(run.steps, run.peak_lr, run.silence)


def curve_steps(steps: int) -> list[int]:
    """The steps a ``curve`` run records: 0 and ``CURVE_POINTS`` evenly spaced ones up to ``steps``."""
    return sorted({0, *(round(steps * i / CURVE_POINTS) for i in range(1, CURVE_POINTS + 1))})


def train(run: Run) -> dict:
    """Train ``run`` through the product (module docstring); the result record (final ``f(Q(x_T)) / f(0)`` per seed,
    the best grid point where known, the loss curve if ``run.curve``)."""
    import torch

    from hf_cage import CAGECorrection, kernels
    from hf_cage.quant import fake_quantize_ste

    start = time.process_time()
    spec = weight_spec(run.quantizer, run.d)
    problems = [problem(s, run.d, run.kappa) for s in run.seeds]
    a = torch.stack([p[0] for p in problems]).float()
    x_star = torch.stack([p[1] for p in problems]).float()
    x = torch.nn.Parameter(torch.stack([p[2] for p in problems]).float())
    f, gradient = objective(a, x_star)
    f0 = f(torch.zeros_like(x_star))

    def quantize(w):
        return kernels.fake_quantize(w, spec)[0]

    if run.optimizer == "adam":
        opt = torch.optim.Adam([x], lr=run.peak_lr, betas=(0.9, 0.95))
    elif run.optimizer == "sgd":
        opt = torch.optim.SGD([x], lr=run.peak_lr)
    else:
        raise ValueError(f"optimizer={run.optimizer!r} is not supported; use 'sgd' or 'adam'")
    lam = lambda_for(run)
    if run.variant != "ste":
        CAGECorrection(
            opt,
            weight_quantizers={x: quantize},
            cage_lambda=lam,
            cage_silence_ratio=run.silence,
            cage_variant=run.variant,
            total_steps=run.steps,
        )
    sched = make_scheduler(opt, run.steps)
    logged = set(curve_steps(run.steps)) if run.curve else set()
    curve = []

    def ratio() -> list[float]:
        with torch.no_grad():
            return (f(quantize(x.detach())) / f0).tolist()

    for step in range(run.steps + 1):
        if step in logged:
            curve.append(ratio())
        if step == run.steps:
            break
        opt.zero_grad(set_to_none=True)
        y = fake_quantize_ste(x, spec)
        with torch.no_grad():
            grad_y = gradient(y)
        (y * grad_y).sum().backward()  # d/dx through the STE of f's gradient at Q(x): one matvec a step
        opt.step()
        sched.step()
    final = ratio()
    with torch.no_grad():
        rtn = (f(quantize(x_star)) / f0).tolist()
    record = {**asdict(run), "key": run.key, "lam": lam, "lr": run.peak_lr, "final": final, "rtn": rtn}
    if run.curve:
        record["curve_steps"], record["curve"] = sorted(logged), curve
    record.update(best_points(run, problems, x.detach()))
    record["seconds"] = round(time.process_time() - start, 2)  # CPU time (one thread)
    return record

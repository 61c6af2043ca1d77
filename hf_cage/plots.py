"""The loss-curve figure that exports and the recipes write (``loss_curve.png``)."""

from __future__ import annotations

import os


def plot_loss_curve(
    log_history: list[dict], path: str | os.PathLike, title: str | None = None, lambda_axis: bool = False
) -> bool:
    """Write a PNG of the training (and eval) loss against the optimizer step to ``path``.

    ``log_history`` is ``Trainer.state.log_history``; ``title`` heads the plot; ``lambda_axis`` adds CAGE's logged
    ``cage/lambda`` on a second axis when it is ever non-zero. Returns False (and writes nothing) when the logs hold
    no loss.
    """
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    lambdas = [(h["step"], h["cage/lambda"]) for h in log_history if "cage/lambda" in h and "step" in h]
    if lambda_axis and any(v for _, v in lambdas):
        twin = ax.twinx()
        twin.plot(*zip(*lambdas), ":", color="gray", label="CAGE lambda")
        twin.set_ylabel("CAGE lambda")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True

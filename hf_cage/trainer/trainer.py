"""``CAGETrainer``: ``transformers.Trainer`` that quantizes the model and trains it with CAGE.

What it adds to ``Trainer`` (everything else is Trainer's own code path):

- at construction, a model without ``QATLinear`` layers is quantized with ``args.quant_config()``;
- ``create_optimizer`` builds :class:`hf_cage.CAGE` from the config (``learning_rate``,
  ``weight_decay``, ``adam_beta1/2``, ``adam_epsilon`` and the ``cage_*`` fields), with
  ``total_steps`` = the Trainer's own number of optimizer steps; a user optimizer
  (``optimizers=(opt, sched)`` or ``optimizer_cls_and_kwargs``) is wrapped with
  :class:`hf_cage.CAGECorrection` instead (decoupled variant);
- ``training_step`` records the lambda of the coming optimizer step; ``log`` adds ``cage/lambda``
  (the lambda of the last optimizer step), ``cage/quant_error`` and ``cage/clip_fraction`` to the
  training logs.

The schedule advances inside ``optimizer.step()``, so it counts optimizer steps, not micro-batches.
On ``resume_from_checkpoint`` the schedule counter and the moments come from the checkpoint and the
``cage_*`` settings from ``args`` (see :mod:`hf_cage.optim.cage`): a resumed run continues exactly,
and resuming an STE checkpoint with ``cage_lambda > 0`` branches a CAGE run from it.
"""

from __future__ import annotations

import logging

from transformers import Trainer

from ..optim.cage import CAGE
from ..optim.correction import CAGECorrection
from ..optim.factory import create_cage_optimizer
from ..qat import quant_config_of, quantize_model
from .config import CAGEConfig
from .metrics import quantization_metrics

logger = logging.getLogger(__name__)


class CAGETrainer(Trainer):
    """A ``Trainer`` for CAGE quantization-aware training; ``args`` must be a :class:`hf_cage.CAGEConfig`."""

    def __init__(self, model=None, args: CAGEConfig | None = None, *positional, **kwargs):
        if not isinstance(args, CAGEConfig):
            raise TypeError(
                f"CAGETrainer needs args=hf_cage.CAGEConfig(...), got {type(args).__name__}; "
                "CAGEConfig accepts every TrainingArguments field"
            )
        if model is not None:
            existing = quant_config_of(model)
            if existing is None:
                quantize_model(model, args.quant_config())
            elif existing != args.quant_config():
                logger.warning("model is already quantized with %s; the quant_* fields of args are ignored", existing)
        self._cage_lambdas: list[float] = []
        super().__init__(model, args, *positional, **kwargs)
        if self.optimizer is not None and not isinstance(self.optimizer, (CAGE, CAGECorrection)):
            self.optimizer = CAGECorrection(self.optimizer, self.model, **self._correction_kwargs())

    def _total_steps(self) -> int | None:
        steps = self.state.max_steps or self.args.max_steps
        return steps if steps and steps > 0 else None

    def _correction_kwargs(self) -> dict:
        kwargs = self.args.cage_kwargs()
        if kwargs["cage_variant"] != "decoupled":
            raise ValueError(
                f"cage_variant={kwargs['cage_variant']!r} needs hf_cage.CAGE; a user-supplied optimizer can only "
                "get the decoupled correction (set cage_variant='decoupled' or drop the custom optimizer)"
            )
        return {**kwargs, "total_steps": self._total_steps()}

    def cage_optimizer(self) -> CAGE | CAGECorrection | None:
        """The CAGE optimizer or correction wrapper under accelerate's wrapping, if one was built."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, (CAGE, CAGECorrection)):
            opt = getattr(opt, "optimizer", None)
        return opt

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None and self.optimizer_cls_and_kwargs is not None:
            super().create_optimizer(model)
            self.optimizer = CAGECorrection(self.optimizer, opt_model, **self._correction_kwargs())
        elif self.optimizer is None:
            args = self.args
            self.optimizer = create_cage_optimizer(
                opt_model,
                lr=args.learning_rate,
                weight_decay=args.weight_decay,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
                total_steps=self._total_steps(),
                **args.cage_kwargs(),
            )
        else:
            inner = self.cage_optimizer()
            if isinstance(inner, CAGECorrection) and self._total_steps():
                inner.total_steps = self._total_steps()
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        opt = self.cage_optimizer()
        if opt is not None:
            self._cage_lambdas.append(opt.next_lambda())
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._cage_lambdas:
            logs["cage/lambda"] = self._cage_lambdas[-1]
            logs.update(quantization_metrics(self.model))
            self._cage_lambdas.clear()
        super().log(logs, start_time)

"""``CAGETrainer``: ``transformers.Trainer`` that quantizes the model and trains it with CAGE.

What it adds to ``Trainer`` (everything else, the optimizer included, is Trainer's own code path):

- at construction, a model without ``QATLinear`` layers is quantized with ``args.quant_config()``;
- ``create_optimizer`` is ``Trainer.create_optimizer`` (``--optim``, ``optim_args``,
  ``optimizer_cls_and_kwargs``, Trainer's device-mesh-aware param groups) with the CAGE correction
  (:class:`hf_cage.CAGECorrection`) attached to the optimizer it builds, or to a user optimizer
  passed with ``optimizers=(opt, sched)``. ``--optim adamw_torch`` (the default) and
  ``adamw_torch_fused`` give AdamW + CAGE, i.e. :class:`hf_cage.CAGE`, in either variant; any other
  torch optimizer gets the decoupled correction (``cage_variant='coupled'`` is refused with it); an
  ``--optim`` that is not a ``torch.optim.Optimizer`` is refused;
- weight decay follows hf-cage's one policy (:func:`hf_cage.optim.decay_parameter_names`): only the
  quantized block linears are decayed, not embeddings, ``lm_head``, norms or biases;
- ``create_scheduler(num_training_steps)``: the number of optimizer steps Trainer passes on at every
  ``train()`` (also after an ``auto_find_batch_size`` retry) starts the correction's schedule
  (``total_steps``, counter back to 0); a resumed run then loads its counter from the checkpoint.
  With ``cage_pull`` it first sets lambda so that ``sum_t lr_t * lambda_t`` over the whole run
  (``t = 1 .. num_training_steps``, ``lr_t`` from the scheduler just built, :mod:`hf_cage.optim.pull`)
  equals ``cage_pull``: a run resumed or branched from step ``k`` gets the lambda of the whole run and
  realises the part of the pull after ``k`` (all of it when ``k`` is within the silence period);
- ``log`` adds ``cage/lambda`` (the lambda of the last optimizer step), ``cage/pull`` (``sum_t lr_t *
  lambda_t`` so far), ``cage/quant_error`` and ``cage/clip_fraction``
  (:func:`hf_cage.trainer.quantization_metrics`) to the training logs, and ``cage/peak_lambda`` (the
  lambda of the run) with the realised ``cage/pull`` to the run's final summary.

FSDP2 (``fsdp_version: 2``) is supported: the correction works on the local row shards. FSDP1 (flat
parameters) is refused, and so is an FSDP launch that accelerate ran without FSDP (accelerate 1.15 enables
its FSDP plugin only on GPU-class devices, so on a CPU-only machine it would silently train unsharded).
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import Trainer

from ..optim.correction import CAGECorrection, cage_correction_of
from ..optim.factory import decay_parameter_names
from ..optim.pull import lambda_for_pull, scheduled_learning_rates
from ..qat import quant_config_of, quantize_model
from .config import CAGEConfig
from .metrics import quantization_metrics

logger = logging.getLogger(__name__)

COUPLED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


class CAGETrainer(Trainer):
    """A ``Trainer`` for CAGE quantization-aware training; ``args`` must be a :class:`hf_cage.CAGEConfig`.

    ``self.cage_correction`` is the :class:`hf_cage.CAGECorrection` attached to the optimizer (``None``
    until the optimizer exists).
    """

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
        self.cage_correction: CAGECorrection | None = None
        super().__init__(model, args, *positional, **kwargs)
        self._check_fsdp()
        if self.optimizer is not None:
            self._attach_correction(self.optimizer)

    def _check_fsdp(self) -> None:
        """FSDP2 only; and never an FSDP launch that accelerate silently ran without FSDP."""
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "CAGE does not support FSDP1 (flat parameters); use FSDP2: fsdp_version: 2 in the accelerate config "
                "(recipes/accelerate_configs/fsdp.yaml) or --fsdp_config '{\"fsdp_version\": 2}'"
            )
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not self.is_fsdp_enabled:
            raise ValueError(
                "accelerate was launched with an FSDP config but did not enable FSDP (accelerate enables it only on "
                "GPU-class devices, not on CPU): the model would be trained unsharded; on CPU use DDP "
                "(recipes/accelerate_configs/cpu_ddp.yaml) or shard with torch's fully_shard yourself"
            )

    def get_decay_parameter_names(self, model) -> list[str]:
        """hf-cage's weight-decay policy: the quantized block linears' weights only."""
        return decay_parameter_names(model)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if cage_correction_of(optimizer) is None:
            self._attach_correction(optimizer)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.cage_correction is not None:
            self._start_cage_run(scheduler, num_training_steps)
        return scheduler

    def _start_cage_run(self, scheduler, total_steps: int) -> None:
        """Start the correction's schedule for a run of ``total_steps``; with ``cage_pull``, pick its lambda first."""
        correction, pull = self.cage_correction, self.args.cage_pull
        if pull is not None:
            rates = scheduled_learning_rates(scheduler, correction.weight_quantizers, total_steps)
            correction.cage_lambda = lambda_for_pull(
                pull, rates, correction.cage_silence_ratio, correction.cage_schedule
            )
            logger.info(
                "cage_pull=%g: lambda %.6g over the run's %d steps (%s LR schedule, silence %g)",
                pull, correction.cage_lambda, total_steps, self.args.lr_scheduler_type, correction.cage_silence_ratio,
            )  # fmt: skip
        correction.start_run(total_steps)

    def _attach_correction(self, optimizer) -> None:
        inner = optimizer
        while not isinstance(inner, torch.optim.Optimizer) and getattr(inner, "optimizer", None) is not None:
            inner = inner.optimizer
        where = f"--optim {self.args.optim}" if self.optimizer_cls_and_kwargs is None else "optimizer_cls_and_kwargs"
        if not isinstance(inner, torch.optim.Optimizer):
            raise ValueError(
                f"{where} built a {type(inner).__name__}, which is not a torch.optim.Optimizer: the CAGE correction "
                "attaches through torch's optimizer step hooks; use --optim adamw_torch (or any torch optimizer)"
            )
        kwargs = self.args.cage_kwargs()
        if kwargs["cage_variant"] == "coupled" and not isinstance(inner, COUPLED_OPTIMIZERS):
            raise ValueError(
                f"cage_variant='coupled' needs Adam's moments (--optim adamw_torch or adamw_torch_fused), but the "
                f"optimizer is {type(inner).__name__}; it can take the decoupled correction: --cage_variant decoupled"
            )
        self.cage_correction = CAGECorrection(inner, self.model, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        correction = self.cage_correction
        if "loss" in logs and correction is not None and correction.total_steps:
            steps = correction.steps_taken
            logs["cage/lambda"] = correction.lambda_at(steps) if steps else 0.0
            logs["cage/pull"] = correction.pull_realised
            logs.update(quantization_metrics(self.model))
        elif "train_runtime" in logs and correction is not None and correction.total_steps:  # the run's summary
            logs["cage/peak_lambda"] = correction.cage_lambda
            logs["cage/pull"] = correction.pull_realised
        super().log(logs, start_time)

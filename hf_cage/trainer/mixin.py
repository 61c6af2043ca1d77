"""``CAGETrainerMixin``: CAGE quantization-aware training for any ``transformers.Trainer`` subclass.

``class MyTrainer(CAGETrainerMixin, SomeTrainer)`` (the mixin first) adds to ``SomeTrainer``, through ``super()``:

- ``__init__``: quantizes ``model`` with ``args.quant_config()`` (before ``SomeTrainer.__init__``, or right after it
  when the trainer loads the model from a name or path); every argument is forwarded by keyword, bound to
  ``SomeTrainer.__init__``'s own signature, so positional calls keep their meaning; a ``ref_model`` parameter left
  ``None`` gets a dense copy taken before quantization (not with PEFT, whose reference is the base model);
- ``create_optimizer``: Trainer's own optimizer (or the one passed in ``optimizers=``) with
  :class:`hf_cage.CAGECorrection` attached; ``get_decay_parameter_names``: hf-cage's one weight-decay rule;
- ``create_scheduler``: starts the correction's schedule for the run (every ``train()``); with ``cage_pull`` it first
  picks lambda from the whole run's learning rates (:mod:`hf_cage.optim.pull`);
- ``log``: ``cage/lambda``, ``cage/pull``, ``cage/quant_error``, ``cage/clip_fraction`` in each training log,
  ``cage/peak_lambda`` and ``cage/pull`` in the run's summary; ``save_model``: ``log_history.json`` beside a save.

Raises ``TypeError`` when ``args`` lacks the :class:`hf_cage.CAGEArguments` fields, and ``ValueError`` for an
optimizer that is not a ``torch.optim.Optimizer``, ``cage_variant='coupled'`` without Adam, FSDP1 (flat
parameters), or an FSDP launch that accelerate ran unsharded. docs/training.md describes each behaviour.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..optim.correction import CAGECorrection, cage_correction_of
from ..optim.factory import decay_parameter_names
from ..optim.pull import lambda_for_pull, scheduled_learning_rates
from ..qat import quant_config_of, quantize_model
from .config import CAGEArguments
from .metrics import quantization_metrics

logger = logging.getLogger(__name__)

COUPLED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)
LOG_HISTORY_FILE = "log_history.json"  # the name the recipes write and hf-cage export reads


def _keyword_arguments(init, args: tuple, kwargs: dict) -> dict:
    """``args`` and ``kwargs`` of a call to ``init`` (a bound ``__init__``), all by name."""
    signature = inspect.signature(init)
    bound = signature.bind_partial(*args, **kwargs).arguments
    named = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"pass the arguments after {name!r} by keyword (they have no name to forward)")
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


class CAGETrainerMixin:
    """CAGE for a ``transformers.Trainer`` subclass (see the module docstring); ``args`` must carry the
    :class:`hf_cage.CAGEArguments` fields (``hf_cage.CAGEConfig``, ``hf_cage.trl.CAGESFTConfig``, ...).

    ``self.cage_correction`` is the :class:`hf_cage.CAGECorrection` attached to the optimizer (``None``
    until the optimizer exists).
    """

    def __init__(self, *args, **kwargs):
        named = _keyword_arguments(super().__init__, args, kwargs)
        config = named.get("args")
        if not isinstance(config, CAGEArguments):
            raise TypeError(
                f"{type(self).__name__} needs args with hf-cage's quant_*/cage_* fields, got {type(config).__name__}: "
                "pass hf_cage.CAGEConfig(...), hf_cage.trl.CAGESFTConfig / CAGEDPOConfig, or a dataclass "
                "`class C(hf_cage.CAGEArguments, YourConfig)`"
            )
        model = named.get("model")
        if isinstance(model, nn.Module):
            peft = named.get("peft_config") is not None or hasattr(model, "peft_config")  # the reference is the base
            takes_reference = "ref_model" in inspect.signature(super().__init__).parameters
            if takes_reference and named.get("ref_model") is None and quant_config_of(model) is None and not peft:
                named["ref_model"] = copy.deepcopy(model)  # the reference stays dense
            self._quantize(model, config)
        self.cage_correction: CAGECorrection | None = None
        super().__init__(**named)
        if not isinstance(model, nn.Module):  # loaded by the trainer itself (a name or a path)
            self._quantize(self.model, config)
        self._check_fsdp()
        if self.optimizer is not None:
            self._attach_correction(self.optimizer)

    @staticmethod
    def _quantize(model: nn.Module, config: CAGEArguments) -> None:
        existing = quant_config_of(model)
        if existing is None:
            quantize_model(model, config.quant_config())
        elif existing != config.quant_config():
            logger.warning("model is already quantized with %s; the quant_* fields of args are ignored", existing)

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

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``; a save of yours (not a checkpoint's, which has ``trainer_state.json``) also gets
        the run's ``log_history.json``, from which ``hf-cage export`` writes the card's training summary and loss
        curve."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save and self.state.log_history:
            path = Path(output_dir or self.args.output_dir) / LOG_HISTORY_FILE
            path.write_text(json.dumps(self.state.log_history, indent=1) + "\n", encoding="utf-8")

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        correction = self.cage_correction
        if "loss" in logs and correction is not None and correction.total_steps:
            steps = correction.steps_taken
            logs["cage/lambda"] = correction.lambda_at(steps) if steps else 0.0
            logs["cage/pull"] = correction.pull_realised
            logs.update(quantization_metrics(self.model))
        elif "train_runtime" in logs and correction is not None and correction.total_steps:  # the run's summary
            logs["cage/peak_lambda"] = correction.cage_lambda
            logs["cage/pull"] = correction.pull_realised
        super().log(logs, *args, **kwargs)

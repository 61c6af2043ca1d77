"""``CAGEArguments``: the ``quant_*`` (what to quantize) and ``cage_*`` (how to train) fields, composable with any
``TrainingArguments`` subclass; ``CAGEConfig``: them over ``TrainingArguments``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from ..kernels.grid import get_grid, grid_names
from ..kernels.spec import SCALE_RULES, SUPPORTED_BITS
from ..optim.defaults import CAGE_LAMBDA, CAGE_PULL_DEFAULTS, CAGE_SCHEDULE, CAGE_SILENCE_RATIO, CAGE_VARIANT
from ..optim.pull import check_cage_pull
from ..optim.schedule import SCHEDULES, VARIANTS, check_cage_hyperparameters
from ..quant.config import GRANULARITIES, GROUP_SIZES, QuantConfig


@dataclass
class CAGEArguments:
    """The ``quant_*`` (what to quantize) and ``cage_*`` (how CAGE trains) fields, for any ``TrainingArguments``.

    A dataclass with no base, so that it composes with any ``TrainingArguments`` subclass without touching
    that subclass's defaults; put it first among the bases (its ``__post_init__`` runs the base's, then checks
    its own fields)::

        @dataclass
        class MyConfig(CAGEArguments, SFTConfig):
            pass

    :class:`CAGEConfig` is ``CAGEArguments`` over ``TrainingArguments``; ``hf_cage.trl`` has TRL's configs.
    ``__post_init__`` raises ``ValueError`` naming the field for a value out of range, a ``quant_*`` combination
    ``QuantConfig`` refuses, or ``cage_pull`` set together with ``cage_lambda``.
    """

    quant_w_bits: int = field(default=4, metadata={"help": f"Weight bits, one of {SUPPORTED_BITS}."})
    quant_a_bits: int | None = field(
        default=4,
        metadata={"help": f"Input-activation bits, one of {SUPPORTED_BITS}; 0 (or None) = weight-only quantization."},
    )
    quant_quantizer: str = field(
        default="quest",
        metadata={
            "help": "The grid, one of the registered grids: "
            + ", ".join(f"'{name}' ({get_grid(name).description})" for name in grid_names())
            + "; a grid may fix its bits and group (FP4: 4-bit with the format's group)."
        },
    )
    quant_granularity: str = field(
        default="channel", metadata={"help": "'channel' (one weight scale per output row) or 'group'."}
    )
    quant_group_size: int | None = field(
        default=None,
        metadata={
            "help": f"Inputs per weight scale with quant_granularity='group', one of {GROUP_SIZES} (default 128); "
            "grids that fix their group use it (mxfp4 32, nvfp4 16)."
        },
    )
    quant_hadamard: bool | None = field(
        default=None,
        metadata={
            "help": "Rotate inputs by a block Hadamard (blocks up to 128). Default: the grid's (true for quest only)."
        },
    )
    quant_clip: str | None = field(
        default=None,
        metadata={
            "help": f"Weight scale rule, one of {', '.join(SCALE_RULES)}: mse = Gaussian-MSE-optimal clip "
            "alpha_b * RMS (the default), absmax, minmax = compressed-tensors' rule (as quant_a_clip). Grids with "
            "their own rule (FP4): leave unset."
        },
    )
    quant_a_clip: str | None = field(
        default=None,
        metadata={
            "help": "Activation scale rule: 'minmax' (compressed-tensors' dynamic per-token rule, what stock loaders "
            "serve), 'mse' or 'absmax'. Default: the grid's (minmax for int, mse for quest)."
        },
    )
    cage_lambda: float | None = field(
        default=None,
        metadata={
            "help": f"CAGE correction strength (default {CAGE_LAMBDA:g}, the paper's, unless cage_pull is set; not "
            "both). 0 = the STE / QuEST baseline, no correction."
        },
    )
    cage_pull: float | None = field(
        default=None,
        metadata={
            "help": "CAGE strength as the total pull sum_t lr_t * lambda_t over the whole run (not with cage_lambda): "
            "the trainer picks lambda from the run's own LR schedule, length and silence ratio at each train(). "
            f"Typical: pretraining {CAGE_PULL_DEFAULTS['pretraining']:g}, fine-tuning "
            f"{CAGE_PULL_DEFAULTS['fine-tuning']:g}. 0 = the STE baseline."
        },
    )
    cage_silence_ratio: float = field(
        default=CAGE_SILENCE_RATIO,
        metadata={
            "help": "Fraction of the optimizer steps before the correction starts, in [0, 1) "
            f"(paper: {CAGE_SILENCE_RATIO:g})."
        },
    )
    cage_schedule: str = field(
        default=CAGE_SCHEDULE,
        metadata={"help": f"Lambda schedule after the silence period: one of {', '.join(SCHEDULES)}."},
    )
    cage_variant: str = field(
        default=CAGE_VARIANT,
        metadata={
            "help": f"One of {', '.join(VARIANTS)}: decoupled = post-step pull toward Q(W) (paper's code); "
            "coupled = lambda * (W - Q(W)) added to the gradient."
        },
    )

    def __post_init__(self):
        base_post_init = getattr(super(), "__post_init__", None)
        if base_post_init is not None:
            base_post_init()
        if isinstance(self.quant_a_bits, str):
            self.quant_a_bits = (
                None if self.quant_a_bits.strip().lower() in ("none", "0", "") else int(self.quant_a_bits)
            )
        if self.quant_a_bits == 0:
            self.quant_a_bits = None
        _check("quant_w_bits", self.quant_w_bits, SUPPORTED_BITS)
        _check("quant_a_bits", self.quant_a_bits, (*SUPPORTED_BITS, None), "0 or None (weight-only)")
        _check("quant_quantizer", self.quant_quantizer, grid_names())
        _check("quant_granularity", self.quant_granularity, GRANULARITIES)
        try:
            self.quant_config()  # the one validation of clip, group_size and what the grid fixes
        except ValueError as err:
            message = str(err)
            if message.split("=", 1)[0] in {f.name for f in fields(QuantConfig)}:
                message = f"quant_{message}"  # name the field as it is set here
            raise ValueError(
                f"invalid quant_* settings: {message} (each QuantConfig field is set by quant_<name>)"
            ) from err
        if self.cage_pull is not None and self.cage_lambda is not None:
            raise ValueError(
                f"cage_pull={self.cage_pull:g} and cage_lambda={self.cage_lambda:g} both set; set one: cage_pull "
                "picks lambda from the run's schedule, cage_lambda fixes it"
            )
        if self.cage_pull is None and self.cage_lambda is None:
            self.cage_lambda = CAGE_LAMBDA
        if self.cage_pull is not None:
            check_cage_pull(self.cage_pull)
        check_cage_hyperparameters(
            self.cage_lambda or 0.0, self.cage_silence_ratio, self.cage_schedule, self.cage_variant, 1
        )

    def quant_config(self) -> QuantConfig:
        """The :class:`hf_cage.QuantConfig` these ``quant_*`` fields describe (Llama block linears as targets)."""
        return QuantConfig(
            w_bits=self.quant_w_bits,
            a_bits=self.quant_a_bits,
            quantizer=self.quant_quantizer,
            granularity=self.quant_granularity,
            group_size=self.quant_group_size,
            hadamard=self.quant_hadamard,
            clip=self.quant_clip,
            a_clip=self.quant_a_clip,
        )

    def cage_kwargs(self) -> dict:
        """The ``cage_*`` hyperparameters as keyword arguments of :class:`hf_cage.CAGECorrection` / ``CAGE``
        (with ``cage_pull``, ``cage_lambda`` is 0 until the trainer picks it at the start of each run)."""
        return {
            "cage_lambda": 0.0 if self.cage_lambda is None else self.cage_lambda,
            "cage_silence_ratio": self.cage_silence_ratio,
            "cage_schedule": self.cage_schedule,
            "cage_variant": self.cage_variant,
        }


@dataclass
class CAGEConfig(CAGEArguments, TrainingArguments):
    """Training arguments for :class:`hf_cage.CAGETrainer`: ``TrainingArguments`` plus :class:`CAGEArguments`.

    Every ``TrainingArguments`` field keeps its meaning (``learning_rate``, ``weight_decay``,
    ``adam_beta1/2``, ``adam_epsilon``, ``max_grad_norm``, ``optim``, schedulers, ...). The optimizer
    Trainer builds from them (or the one you pass) gets the CAGE correction attached
    (:class:`hf_cage.CAGECorrection`): ``--optim adamw_torch`` / ``adamw_torch_fused`` is AdamW + CAGE
    in either variant, other torch optimizers take the decoupled one. ``weight_decay`` applies to the
    quantized block linears only. ``cage_lambda=0`` is the STE / QuEST baseline.
    """


def _check(name: str, value, allowed: tuple, extra: str = "") -> None:
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed if a is not None) + (f", or {extra}" if extra else "")
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {shown}")

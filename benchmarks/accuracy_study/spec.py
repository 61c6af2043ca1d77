"""One training run of the accuracy benchmark (:class:`Spec`), its key in the results files, and its CAGE strength."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
STUDIES = ("practical", "pretrain", "finetune", "map", "formats")
# Every STE run leaves a checkpoint at these fractions of its steps; CAGE runs branch from them.
BRANCH_POINTS = (0.25, 0.5, 0.8)
BATCH, BLOCK, VOCAB, EVAL_BLOCKS = 16, 256, 2048, 512
# Seconds per optimizer step with one thread on this machine's CPU (measured through the Trainer, 60 steps).
SECONDS_PER_STEP = {("bf16", 64): 0.26, ("qat", 64): 0.32, ("bf16", 32): 0.12, ("qat", 32): 0.16}


@dataclass(frozen=True)
class Spec:
    """One training run; ``key`` names it in the results files."""

    study: str
    method: str  # "bf16", "ste", "cage"
    seed: int
    steps: int
    w_bits: int | None = None
    a_bits: int | None = None
    quantizer: str = "quest"
    group: int | None = None  # weight group size (granularity "group"); None: one scale per output channel
    lam: float = 0.0
    silence: float = 0.0
    pull: float | None = None  # CAGE strength as the total pull sum_t lr_t * lambda_t (lambda from the schedule)
    variant: str = "decoupled"
    hidden: int = 64
    ffn: int = 192
    layers: int = 2
    heads: int = 4
    lr: float = 2e-3
    init: str | None = None  # key of the BF16 run a fine-tuning run starts from
    data_seed: int | None = None  # data order (default: ``seed``)
    save: bool = False  # keep the final model under OUT/models/<key> (fine-tuning bases, exports)
    block: int = BLOCK
    batch: int = BATCH
    vocab: int = VOCAB
    eval_blocks: int = EVAL_BLOCKS
    # BF16 only: "trainer" = Trainer's own AdamW groups (decays embeddings and lm_head too, the recipes' baseline);
    # "blocks" = weight decay on the block linears only, as CAGETrainer decays (a like-for-like control)
    bf16_decay: str = "trainer"

    @property
    def fmt(self) -> str:
        if self.method == "bf16":
            return "bf16"
        acts = f"a{self.a_bits}" if self.a_bits else ""
        return f"w{self.w_bits}{acts}-{self.quantizer}" + (f"-g{self.group}" if self.group else "")

    @property
    def key(self) -> str:
        name = f"{self.study}-h{self.hidden}-n{self.steps}-{self.fmt}-{self.method}-s{self.seed}"
        if self.method == "cage":
            strength = f"-l{self.lam:g}" if self.pull is None else f"-p{self.pull:g}"
            name += f"{strength}-q{self.silence:g}" + ("-coupled" if self.variant == "coupled" else "")
        if self.lr != 2e-3:
            name += f"-lr{self.lr:g}"
        if self.bf16_decay != "trainer":
            name += f"-decay{self.bf16_decay}"
        return name

    @property
    def parent(self) -> Spec | None:
        """The STE run a CAGE run branches from (None: trained from its start)."""
        if self.method != "cage" or self.silence == 0:
            return None
        return replace(self, method="ste", lam=0.0, pull=None, silence=0.0, variant="decoupled", save=False)

    def cage_lambda(self) -> float:
        """The ``cage_lambda`` the run trains with: ``lam``, or the lambda whose total pull is ``pull``."""
        if self.method != "cage":
            return 0.0
        return self.lam if self.pull is None else lambda_for_pull(self.steps, self.lr, self.pull, self.silence)

    @property
    def branch_step(self) -> int:
        return round(self.silence * self.steps)

    @property
    def block_params(self) -> int:
        return self.layers * (4 * self.hidden * self.hidden + 3 * self.hidden * self.ffn)

    @property
    def tokens_per_block_param(self) -> float:
        return self.steps * self.batch * self.block / self.block_params

    def core_minutes(self) -> float:
        per_step = SECONDS_PER_STEP[("bf16" if self.method == "bf16" else "qat", 64 if self.hidden > 32 else 32)]
        trained = self.steps - (self.branch_step if self.parent else 0)
        return (trained * per_step * self.batch / BATCH + 15) / 60


QUICK = dict(hidden=32, ffn=64, steps=12, block=32, batch=4, vocab=300, eval_blocks=8)


def spec_of(record: dict) -> Spec:
    """The ``Spec`` a result line was trained from (fields added later take their defaults)."""
    return Spec(**{k: record[k] for k in Spec.__dataclass_fields__ if k in record})


def preset_learning_rates(steps: int, lr: float) -> list[float]:
    """``lr_t`` for the steps ``t = 1 .. steps`` of the tiny preset's schedule (transformers' ``cosine_with_min_lr``,
    10% warmup, down to 10% of ``lr``), as the Trainer runs it."""
    import math

    import torch
    from transformers import get_scheduler

    from hf_cage.optim.pull import scheduled_learning_rates

    param = torch.zeros(1, requires_grad=True)
    sched = get_scheduler(
        "cosine_with_min_lr",
        torch.optim.SGD([param], lr=lr),
        num_warmup_steps=math.ceil(0.1 * steps),
        num_training_steps=steps,
        scheduler_specific_kwargs={"min_lr_rate": 0.1},
    )
    return scheduled_learning_rates(sched, [param], steps)


def total_pull(steps: int, lr: float, lam: float, silence: float) -> float:
    """The correction's total pull ``sum_t lr_t * lambda_t`` of a run (the preset's schedule, CAGE's linear ramp)."""
    from hf_cage.optim import pull

    return pull.total_pull(preset_learning_rates(steps, lr), lam, silence, "linear_ramp")


def lambda_for_pull(steps: int, lr: float, pull: float, silence: float) -> float:
    """The ``cage_lambda`` whose total pull over the run is ``pull`` (the pull is linear in lambda)."""
    return pull / total_pull(steps, lr, 1.0, silence)

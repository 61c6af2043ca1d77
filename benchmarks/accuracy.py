"""Accuracy benchmark through the product: BF16 vs STE vs CAGE, trained with ``CAGEConfig`` + ``CAGETrainer``.

Every run is a ``transformers.Trainer`` run built exactly as ``recipes/pretrain_llama.py`` and
``recipes/finetune_llama.py`` build theirs (``CAGEConfig`` arguments; ``Trainer`` for BF16, ``CAGETrainer``
for STE and CAGE; the tiny preset's optimizer and schedule: AdamW (0.9, 0.95), weight decay 0.1, 10% warmup,
cosine to 10% of the peak, gradient clip 1.0). "BF16" is the recipes' unquantized baseline, trained in fp32
on the CPU. Every CAGE run branches from the STE run of the same seed at the end of its silence period through
``trainer.train(resume_from_checkpoint=...)``, the trainer's documented branching (weights, Adam moments, LR
schedule, RNG and data position come from the checkpoint, ``cage_*`` from the new arguments), so every
STE/CAGE comparison is paired and a CAGE run costs ``1 - silence`` of a run.

Studies (one results file each under ``--results``, one JSON line per finished run; finished runs are
skipped, so every command is resumable):

- ``practical``: the practical path, QAT fine-tuning into weight-only formats that stock loaders serve: the
  seed-0 BF16 model of ``pretrain`` (retrained under this study's name) fine-tuned 100 steps at peak LR 5e-4
  into W4A16 int (group 32 and 64; group 128 divides neither input width of this model, 64 and 192), W3A16 int
  (group 64), W4A16 MXFP4 and NVFP4, with STE and CAGE, against BF16 fine-tuned the same way, 5 fine-tuning seeds
  (Trainer seed and data order) from the same base. CAGE's strength is a total pull ``sum_t lr_t * lambda_t``
  (silence 0.5, as ``finetune``), turned into ``cage_lambda`` by :func:`lambda_for_pull`; a sweep of the pull
  (0.03 to 2) at W4A16 int group 64 over the same seeds chooses the pull the other formats use. Last, the same
  sweep at CAGEConfig's default silence 0.8 (a 20-step correction here). Before the other formats: 300-step
  fine-tunes (the ``finetune`` length, where CAGE helps) of every format on 5 seeds at the fine-tuning default pull
  0.2, then the pull sweep at 300 steps.
- ``pretrain``: the headline table. Tiny Llama (hidden 64, 2 layers, 4 heads, SwiGLU 192, vocab 2048:
  0.11M block parameters) trained from scratch on the Shakespeare plays, 1500 steps x 16 x 256 tokens
  (6.1M tokens, 58 tokens per block parameter), peak LR 2e-3, QuEST W4A4 and W3A3, CAGE lambda 13 with
  silence 0.5, 3 seeds.
- ``finetune``: QAT fine-tuning of the seed-0 BF16 model of ``pretrain`` to W4A4, W3A3 (QuEST) and
  weight-only W4 (``int``, group 64: the largest group that divides every layer width here; the issue asked
  for 128, which divides none of 64 / 192), 300 steps at peak LR 5e-4, full parameters, against the BF16
  model fine-tuned the same way; lambda / silence from a sweep at W4A4, seed 0 (lambda 50 / 250 / 13 at
  silence 0.5).
- ``map``: share of the STE-to-BF16 gap closed against tokens per block parameter: a smaller Llama
  (hidden 32, 26.6K block parameters) trained 100 / 325 / 975 steps (15 / 50 / 150 tokens per block
  parameter), W4A4 and W3A3, CAGE lambda 13 held fixed and lambda scaled to a total pull of 2, silence 0.5,
  2 seeds; the ``int`` quantizer (deployable activation rule) and the coupled variant at the middle point.
- ``formats``: the 4-bit grids side by side at W4A4: the deployable ``int`` rule, MXFP4 and NVFP4 (E2M1 values,
  compressed-tensors' scale rules) next to ``pretrain``'s QuEST rows and BF16, pretraining as ``pretrain`` does and
  fine-tuning as ``finetune`` does (same steps, LR, data, lambda / silence), 3 seeds; seed 0 models are saved
  for ``served``.
- ``served`` (a command, not a study): the saved QAT runs exported with ``hf-cage export``'s defaults and
  evaluated by stock transformers in a process without hf_cage, next to their training-time eval loss.

Runs train with ``hf_cage`` as committed (a snapshot of a commit under OUT/code, ``--code-commit``), not the
shared working tree, and each result line records that commit.

    # run everything that is not finished, 2 training processes at a time, in priority order
    python benchmarks/accuracy.py run --workers 2
    python benchmarks/accuracy.py served
    # one study only / a seconds-long smoke run of the whole pipeline
    python benchmarks/accuracy.py run --study pretrain
    python benchmarks/accuracy.py run --quick --results /tmp/acc --out /tmp/acc
    # what is left and what it costs (core-minutes, from measured seconds per step)
    python benchmarks/accuracy.py plan
    # tables, plots and docs/results.md from the results files
    python benchmarks/accuracy.py report --write-docs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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


# ----------------------------------------------------------------------------------------------------------
# Plans (in priority order; a plan may read finished results to choose what comes next)

PRETRAIN_VARIANT = (13.0, 0.5)
MAP_VARIANTS = ((13.0, 0.5),)
FT_STEPS, FT_LR = 300, 5e-4
FT_SWEEP = ((50.0, 0.5), (250.0, 0.5), (13.0, 0.5))  # total pulls 0.39, 1.9, 0.10
FT_FORMATS = ((4, 4, "quest", None), (3, 3, "quest", None), (4, None, "int", 64))
FT_W4A4 = "w4a4-quest"
# the formats study: W4A4 grids beside pretrain's QuEST
FORMAT_QUANTIZERS = ("int", "mxfp4", "nvfp4")


def plan_pretrain(seeds: int = 3) -> list[Spec]:
    runs = []
    for seed in range(seeds):
        base = Spec("pretrain", "bf16", seed, 1500)
        runs.append(replace(base, save=seed == 0))
        for bits in (4, 3):
            ste = replace(base, method="ste", w_bits=bits, a_bits=bits)
            runs += [ste, replace(ste, method="cage", lam=PRETRAIN_VARIANT[0], silence=PRETRAIN_VARIANT[1])]
    return runs


def finetune_base() -> Spec:
    return Spec("pretrain", "bf16", 0, 1500, save=True)


def finetune_choice(results: dict[str, dict]) -> tuple[float, float] | None:
    """The sweep's best (lambda, silence): lowest W4A4 eval loss on seed 0; None until the sweep is done."""
    sweep = [results.get(s.key) for s in plan_finetune_sweep()]
    if any(r is None for r in sweep):
        return None
    best = min(sweep, key=lambda r: r["eval_loss"])
    return best["lam"], best["silence"]


def _ft(method: str, seed: int, fmt: tuple = (4, 4, "quest", None), study: str = "finetune", **kw) -> Spec:
    w, a, quantizer, group = fmt
    common = dict(steps=FT_STEPS, lr=FT_LR, init=finetune_base().key, data_seed=1000 + seed)
    if method == "bf16":
        return Spec(study, "bf16", seed, **common)
    return Spec(study, method, seed, w_bits=w, a_bits=a, quantizer=quantizer, group=group, **common, **kw)


def plan_finetune_sweep() -> list[Spec]:
    return [_ft("cage", 0, lam=lam, silence=sil) for lam, sil in FT_SWEEP]


def plan_finetune(results: dict[str, dict], seeds: int = 3) -> list[Spec]:
    choice = finetune_choice(results)
    runs = [_ft("bf16", 0), _ft("ste", 0), *plan_finetune_sweep()]
    for seed in range(seeds):
        runs.append(_ft("bf16", seed))
        for fmt in FT_FORMATS:
            runs.append(_ft("ste", seed, fmt))
            if choice is not None:
                runs.append(_ft("cage", seed, fmt, lam=choice[0], silence=choice[1]))
    return runs


def plan_formats(results: dict[str, dict], seeds: int = 3) -> list[Spec]:
    """Per seed: pretraining (as ``pretrain``) then fine-tuning (as ``finetune``, once its sweep has chosen) of each
    W4A4 grid of ``FORMAT_QUANTIZERS``; the BF16 and QuEST rows come from those two studies."""
    choice = finetune_choice(results)
    runs = []
    for seed in range(seeds):
        for quantizer in FORMAT_QUANTIZERS:
            ste = Spec("formats", "ste", seed, 1500, w_bits=4, a_bits=4, quantizer=quantizer, save=seed == 0)
            runs += [ste, replace(ste, method="cage", lam=PRETRAIN_VARIANT[0], silence=PRETRAIN_VARIANT[1])]
        for quantizer in FORMAT_QUANTIZERS:
            fmt = (4, 4, quantizer, None)
            runs.append(_ft("ste", seed, fmt, study="formats", save=seed == 0))
            if choice is not None:
                runs.append(_ft("cage", seed, fmt, study="formats", lam=choice[0], silence=choice[1], save=seed == 0))
    return runs


# the practical study: QAT fine-tuning into weight-only formats that stock loaders serve
PRACTICAL_STEPS, PRACTICAL_LR, PRACTICAL_SEEDS = 100, 5e-4, 5
PRACTICAL_SILENCE = 0.5  # as the finetune study; CAGEConfig's default 0.8 leaves the correction 20 steps here
PRACTICAL_SILENCE_DEFAULT = 0.8  # CAGEConfig's default: its sweep runs after everything else
PRACTICAL_PULLS = (0.03, 0.1, 0.2, 0.4, 1.0, 2.0)  # the sweep of the total pull, at PRACTICAL_SWEEP_FORMAT
PRACTICAL_SWEEP_FORMAT = (4, None, "int", 64)
# the 3x longer fine-tuning (the finetune study's and the demo's length), where CAGE helps: every format at the
# recipes' fine-tuning default pull (hf_cage.optim.defaults), then the pull sweep on the same 5 seeds
PRACTICAL_LONG_SEEDS = 5
PRACTICAL_LONG_PULL = 0.2  # CAGE_PULL_DEFAULTS["fine-tuning"] when these runs were planned
# group 128 divides none of this model's input widths (64, 192): not measured
PRACTICAL_FORMATS = (PRACTICAL_SWEEP_FORMAT, (4, None, "int", 32), (3, None, "int", 64), (4, None, "mxfp4", None))
PRACTICAL_FORMATS += ((4, None, "nvfp4", None),)


def practical_base() -> Spec:
    """The BF16 model the practical study fine-tunes: ``finetune_base()`` retrained under this study's name."""
    return replace(finetune_base(), study="practical")


def practical_choice(results: dict[str, dict], seeds: int = PRACTICAL_SEEDS, **plan) -> float | None:
    """The fine-tuning default pull: the sweep's pull with the lowest mean CAGE eval loss over ``seeds`` seeds
    (paired: every pull branches from the same STE runs); None until every sweep run has finished."""
    runs = [s for s in plan_practical({}, seeds, **plan) if s.pull is not None and s.fmt == _fmt_of(plan)]
    runs = [s for s in runs if s.silence == PRACTICAL_SILENCE and s.steps == plan.get("steps", PRACTICAL_STEPS)]
    if any(s.key not in results for s in runs):
        return None
    return min(PRACTICAL_PULLS, key=lambda p: _mean([results[s.key]["eval_loss"] for s in runs if s.pull == p]))


def _fmt_of(plan: dict) -> str:
    w, a, quantizer, group = plan.get("sweep_format", PRACTICAL_SWEEP_FORMAT)
    return Spec("x", "ste", 0, 1, w_bits=w, a_bits=a, quantizer=quantizer, group=group).fmt


def plan_practical(
    results: dict[str, dict],
    seeds: int = PRACTICAL_SEEDS,
    base: Spec | None = None,
    steps: int = PRACTICAL_STEPS,
    sweep_format: tuple = PRACTICAL_SWEEP_FORMAT,
    formats: tuple = PRACTICAL_FORMATS,
) -> list[Spec]:
    """Priority order: the BF16 base; per seed the BF16 fine-tuning, STE and CAGE at every pull of
    ``PRACTICAL_PULLS`` at ``sweep_format``; 3x longer on ``PRACTICAL_LONG_SEEDS`` seeds: BF16, STE and CAGE at
    ``PRACTICAL_LONG_PULL`` in every format, then the sweep; then per seed STE and CAGE at the sweep's choice (once made) in the other formats; last, the sweep at
    CAGEConfig's default silence. A seed is a fine-tuning seed (the Trainer's seed and the data order) from the
    same base; every CAGE run branches from the STE run of its seed and format."""
    base = base or practical_base()
    plan = dict(base=base, steps=steps, sweep_format=sweep_format, formats=formats)

    def ft(method: str, seed: int, fmt: tuple = (None, None, "quest", None), n: int = steps, **kw) -> Spec:
        w, a, quantizer, group = fmt
        common = dict(study="practical", seed=seed, steps=n, lr=PRACTICAL_LR, data_seed=1000 + seed, save=False)
        return replace(
            base, method=method, init=base.key, w_bits=w, a_bits=a, quantizer=quantizer, group=group, **common, **kw
        )

    runs = [base]
    for seed in range(seeds):
        runs += [ft("bf16", seed), ft("ste", seed, sweep_format)]
        runs += [ft("cage", seed, sweep_format, pull=p, silence=PRACTICAL_SILENCE) for p in PRACTICAL_PULLS]
    long = 3 * steps  # 300 steps at the default length: the finetune study's
    long_seeds = range(min(seeds, PRACTICAL_LONG_SEEDS))
    for seed in long_seeds:  # the headline cell first, then every format at the default pull, then the sweep
        runs += [ft("bf16", seed, n=long), ft("ste", seed, sweep_format, n=long)]
        runs.append(ft("cage", seed, sweep_format, long, pull=PRACTICAL_LONG_PULL, silence=PRACTICAL_SILENCE))
    for seed in long_seeds:
        for fmt in formats:
            if fmt != sweep_format:
                runs.append(ft("ste", seed, fmt, long))
                runs.append(ft("cage", seed, fmt, long, pull=PRACTICAL_LONG_PULL, silence=PRACTICAL_SILENCE))
    for seed in long_seeds:
        runs += [ft("cage", seed, sweep_format, long, pull=p, silence=PRACTICAL_SILENCE) for p in PRACTICAL_PULLS]
    choice = practical_choice(results, seeds, **plan) if results else None
    for seed in range(seeds):
        for fmt in formats:
            if fmt != sweep_format:
                runs.append(ft("ste", seed, fmt))
                if choice is not None:
                    runs.append(ft("cage", seed, fmt, pull=choice, silence=PRACTICAL_SILENCE))
    for seed in range(seeds):
        runs += [ft("cage", seed, sweep_format, pull=p, silence=PRACTICAL_SILENCE_DEFAULT) for p in PRACTICAL_PULLS]
    return runs


MAP_STEPS = (100, 325, 975)
MAP_SHAPE = dict(hidden=32, ffn=96)


def map_variants(steps: int) -> tuple[tuple[float, float], ...]:
    """The map's two CAGE settings at ``steps``: the headline's lambda 13 held fixed (its total pull grows with the
    run: 0.14 at 100 steps, 1.3 at 975) and lambda scaled to the headline's total pull of about 2 at every length."""
    return (MAP_VARIANTS[0], (float(round(MAP_VARIANTS[0][0] * 1500 / steps)), MAP_VARIANTS[0][1]))


def plan_map(seeds: int = 2) -> list[Spec]:
    runs = []
    for seed in range(seeds):
        for steps in MAP_STEPS:
            base = Spec("map", "bf16", seed, steps, **MAP_SHAPE)
            runs.append(base)
            for bits in (4, 3):
                ste = replace(base, method="ste", w_bits=bits, a_bits=bits)
                runs.append(ste)
                runs += [replace(ste, method="cage", lam=lam, silence=sil) for lam, sil in map_variants(steps)]
        # the deployable int rule and the coupled variant at the middle point
        mid = Spec("map", "ste", seed, MAP_STEPS[1], w_bits=4, a_bits=4, **MAP_SHAPE)
        lam, sil = MAP_VARIANTS[0]
        for bits in (4, 3):
            ste = replace(mid, w_bits=bits, a_bits=bits, quantizer="int", save=True)
            runs += [ste, replace(ste, method="cage", lam=lam, silence=sil)]
        runs.append(replace(mid, method="cage", lam=lam, silence=sil, variant="coupled"))
    return runs


def full_plan(results: dict[str, dict], studies=STUDIES) -> list[Spec]:
    """Priority order. Compute is scarce (a 2-core machine shared with other work, measured at 0.9-2.6 s per
    step instead of 0.12-0.32 s alone), so one of each first: pretraining W4A4 seed 0, fine-tuning W4A4 seed 0
    with its sweep, the map's first seed with lambda 13 at 15 and 50 tokens per parameter, the other fine-tuning
    formats, int W4A4 (served), the map's 150 point at W4A4, then the rest of seed 0 and the other seeds; the FP4
    formats after the second pretraining seed, one seed at a time."""
    pre, ft, mp, fm = plan_pretrain(), plan_finetune(results), plan_map(), plan_formats(results)
    practical = plan_practical(results)

    def first(r: Spec) -> bool:  # BF16, STE and the first CAGE setting of the map
        return r.method != "cage" or (r.lam, r.silence) == MAP_VARIANTS[0]

    def plain(r: Spec) -> bool:  # not the coupled variant
        return r.variant == "decoupled"

    controls = [
        Spec("map", "bf16", 0, MAP_STEPS[1], **MAP_SHAPE, bf16_decay="blocks"),
        Spec("pretrain", "bf16", 0, 1500, bf16_decay="blocks"),
        Spec("map", "bf16", 0, MAP_STEPS[2], **MAP_SHAPE, bf16_decay="blocks"),
    ]
    ordered = (
        practical
        + [r for r in pre if r.seed == 0 and r.fmt in ("bf16", "w4a4-quest")]
        + [r for r in ft if r.seed == 0 and r.fmt in ("bf16", FT_W4A4)]
        + [r for r in mp if r.seed == 0 and r.quantizer == "quest" and plain(r) and first(r) and r.steps < 975]
        + [r for r in ft if r.seed == 0]
        + [r for r in mp if r.seed == 0 and r.fmt == "w4a4-int" and first(r)]
        + controls[:1]
        + [r for r in mp if r.seed == 0 and r.fmt in ("bf16", "w4a4-quest") and plain(r) and first(r)]
        + controls[1:]
        + [r for r in pre if r.seed == 0]
        + [r for r in pre if r.seed == 1 and r.fmt == "w4a4-quest"]
        + [r for r in mp if r.seed == 0 and first(r)]
        + [r for r in pre if r.seed == 1 and r.method != "bf16"]
        + [r for r in mp if r.seed == 1 and first(r)]
        + [r for r in pre if r.seed == 1]
        + [r for r in fm if r.seed == 0]
        + [r for r in pre if r.seed == 2 and r.method != "bf16"]
        + [r for r in ft if r.seed == 1]
        + [r for r in fm if r.seed == 1]
        + [r for r in pre if r.seed == 2]
        + [r for r in ft if r.seed >= 2]
        + [r for r in fm if r.seed >= 2]
        + [r for r in mp if r.seed == 0]
        + [r for r in mp if r.seed == 1]
    )
    seen, out = set(), []
    for r in ordered:
        if r.study in studies and r.key not in seen:
            seen.add(r.key)
            out.append(r)
    return out


def quick_plan() -> list[Spec]:
    base = Spec("pretrain", "bf16", 0, **QUICK, save=True)
    ste = replace(base, method="ste", w_bits=4, a_bits=4, save=False)
    ft = dict(study="finetune", init=base.key, steps=8, lr=1e-3, data_seed=7)
    return [
        base,
        ste,
        replace(ste, method="cage", lam=10.0, silence=0.5),
        replace(base, save=False, **ft),
        replace(ste, **ft),
        replace(ste, method="cage", lam=10.0, silence=0.5, **ft),
    ]


# ----------------------------------------------------------------------------------------------------------
# One run


def prepare_data(out: Path, spec: Spec):
    """Tokenizer, training blocks and the first ``eval_blocks`` validation blocks (Shakespeare, split by play)."""
    from hf_cage.data import load_token_blocks, shakespeare_files, train_bpe_tokenizer, write_document_split

    files = shakespeare_files()
    if spec.vocab != VOCAB:  # the quick smoke run: a few plays
        files = sorted(files)[:4]
    train_txt, val_txt = write_document_split(files, out / f"data-{len(files)}")
    tokenizer = train_bpe_tokenizer([train_txt], vocab_size=spec.vocab, cache_dir=out / "cache")
    train = load_token_blocks([train_txt], tokenizer, spec.block)
    val = load_token_blocks([val_txt], tokenizer, spec.block)
    return tokenizer, train, val.select(range(min(spec.eval_blocks, len(val))))


def training_args(spec: Spec, output_dir: Path):
    """The ``CAGEConfig`` of ``spec``: the tiny preset's optimizer and schedule, no evaluation or saving."""
    from hf_cage import CAGEConfig

    quantized = spec.method != "bf16"
    return CAGEConfig(
        output_dir=str(output_dir),
        max_steps=spec.steps,
        per_device_train_batch_size=spec.batch,
        per_device_eval_batch_size=32,
        learning_rate=spec.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.1,
        max_grad_norm=1.0,
        use_cpu=True,
        seed=spec.seed,
        data_seed=spec.data_seed,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=max(1, spec.steps // 20),
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        label_names=["labels"],
        remove_unused_columns=False,
        quant_w_bits=spec.w_bits if quantized else 4,
        quant_a_bits=spec.a_bits if quantized else 4,
        quant_quantizer=spec.quantizer,
        quant_granularity="group" if spec.group else "channel",
        quant_group_size=spec.group,
        cage_lambda=spec.cage_lambda(),
        cage_silence_ratio=spec.silence,
        cage_variant=spec.variant,
    )


def checkpoint_dir(out: Path, spec: Spec, step: int) -> Path:
    return out / "runs" / spec.key / f"checkpoint-{step}"


def _save_at_callback(steps: set[int]):
    from transformers import TrainerCallback

    class SaveAt(TrainerCallback):
        """Save a full Trainer checkpoint (weights, optimizer, scheduler, RNG) at the given optimizer steps."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in steps:
                control.should_save = True
            return control

    return SaveAt()


def block_decay_adamw(model, args):
    """AdamW with weight decay on the block linears only (CAGETrainer's policy), for the like-for-like BF16 control."""
    import torch

    from hf_cage.quant import LLAMA_TARGET_MODULES

    decay, other = [], []
    for name, param in model.named_parameters():
        is_block_linear = name.endswith(".weight") and name.split(".")[-2] in LLAMA_TARGET_MODULES
        (decay if is_block_linear else other).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
    )


def train(spec: Spec, out: Path) -> dict:
    """Train ``spec`` through the Trainer and return its result line."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        default_data_collator,
        set_seed,
    )

    from hf_cage import CAGETrainer

    torch.set_num_threads(1)
    start = time.perf_counter()
    tokenizer, train_blocks, val_blocks = prepare_data(out, spec)
    run_dir = out / "runs" / spec.key
    args = training_args(spec, run_dir)
    set_seed(spec.seed)
    if spec.init is not None:
        model = AutoModelForCausalLM.from_pretrained(out / "models" / spec.init, dtype=torch.float32)
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden,
            intermediate_size=spec.ffn,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            max_position_embeddings=spec.block,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config).to(torch.float32)
    callbacks = []
    if spec.method == "ste":
        callbacks.append(_save_at_callback({round(f * spec.steps) for f in BRANCH_POINTS}))
    cls = Trainer if spec.method == "bf16" else CAGETrainer
    optimizers = (None, None)
    if spec.method == "bf16" and spec.bf16_decay == "blocks":
        optimizers = (block_decay_adamw(model, args), None)
    trainer = cls(
        model=model,
        args=args,
        train_dataset=train_blocks,
        eval_dataset=val_blocks,
        data_collator=default_data_collator,
        callbacks=callbacks,
        optimizers=optimizers,
    )
    resume = None
    if spec.parent is not None:
        resume = checkpoint_dir(out, spec.parent, spec.branch_step)
        if not resume.is_dir():
            raise FileNotFoundError(f"{resume}: the parent STE run has no checkpoint at step {spec.branch_step}")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    eval_loss = float(trainer.evaluate()["eval_loss"])
    if spec.save:
        trainer.save_model(str(out / "models" / spec.key))
        tokenizer.save_pretrained(str(out / "models" / spec.key))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        **asdict(spec),
        "key": spec.key,
        "eval_loss": eval_loss,
        "train_loss_last": losses[-1] if losses else None,
        "steps_trained": spec.steps - (spec.branch_step if resume else 0),
        "tokens_per_block_param": spec.tokens_per_block_param,
        "seconds": round(time.perf_counter() - start, 1),
        "final_weights_sha": _weights_digest(trainer.model),
        "code_commit": os.environ.get("HF_CAGE_CODE_COMMIT"),
        "cage_lambda": args.cage_lambda,
    }


def _weights_digest(model) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Orchestration: each run in its own process (one torch thread, nice), results appended as JSON lines


def results_path(results: Path, study: str) -> Path:
    return results / f"{study}.jsonl"


def load_results(results: Path) -> dict[str, dict]:
    done = {}
    for study in STUDIES:
        path = results_path(results, study)
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    done[r["key"]] = r
    return done


def _append(results: Path, record: dict) -> None:
    results.mkdir(parents=True, exist_ok=True)
    with open(results_path(results, record["study"]), "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _ready(spec: Spec, done: dict, out: Path) -> bool:
    if spec.parent is not None and spec.parent.key not in done:
        return False
    return spec.init is None or (out / "models" / spec.init / "config.json").is_file()


def code_snapshot(out: Path, commit: str = "HEAD") -> tuple[Path, str]:
    """``hf_cage`` at a commit (default ``HEAD``) plus this file, under OUT/code/<sha>: runs use committed library
    code (the shared working tree may be mid-edit), and every result records the commit it was trained with."""
    sha = subprocess.run(["git", "rev-parse", commit], cwd=REPO, capture_output=True, text=True, check=True)
    sha = sha.stdout.strip()
    target = out / "code" / sha[:12]
    if not (target / "hf_cage" / "__init__.py").is_file():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "hf_cage"], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    shutil.copyfile(__file__, target / "accuracy_snapshot.py")
    check = "import hf_cage, hf_cage.export; from hf_cage import CAGEConfig, CAGETrainer"
    env = {**os.environ, "PYTHONPATH": str(target)}
    if subprocess.run([sys.executable, "-c", check], env=env, cwd=target, capture_output=True).returncode != 0:
        raise SystemExit(f"hf_cage at {sha[:12]} does not import (see {target}); pass --code-commit with a good one")
    return target, sha[:12]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _launch(spec: Spec, out: Path, code: Path, sha: str) -> subprocess.Popen:
    log = out / "logs" / f"{spec.key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.update(HF_DATASETS_OFFLINE="1", PYTHONPATH=str(code), HF_CAGE_CODE_COMMIT=sha)
    command = ["nice", "-n", "10", sys.executable, str(code / "accuracy_snapshot.py"), "one"]
    command += [
        "--spec",
        json.dumps(asdict(spec)),
        "--out",
        str(out),
        "--result-file",
        str(out / "runs" / f"{spec.key}.json"),
    ]
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    (out / "runs" / f"{spec.key}.pid").write_text(str(proc.pid))
    return proc


def command_run(args) -> int:
    """Launch runs in priority order, ``--workers`` at a time. Restartable at any moment: a run still going from an
    earlier driver (its pid file) keeps its slot, and its result is collected when it appears."""
    out, results = Path(args.out), Path(args.results)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    studies = tuple(args.study.split(",")) if args.study else STUDIES
    commits = dict(part.split("=", 1) if "=" in part else ("*", part) for part in args.code_commit.split(","))
    snapshots = {study: code_snapshot(out, commits.get(study, commits.get("*", "HEAD"))) for study in studies}
    children: dict[str, subprocess.Popen] = {}
    failed: set[str] = set()

    def specs() -> list[Spec]:
        chosen = quick_plan() if args.quick else full_plan(load_results(results), studies)
        return [s for s in chosen if not args.only or any(part in s.key for part in args.only.split(","))]

    while True:
        done = load_results(results)
        running = set()
        for pid_file in (out / "runs").glob("*.pid"):
            key = pid_file.stem
            proc = children.get(key)
            alive = proc.poll() is None if proc is not None else _alive(int(pid_file.read_text() or 0))
            if alive:
                running.add(key)
                continue
            pid_file.unlink()
            children.pop(key, None)
            result_file = out / "runs" / f"{key}.json"
            if result_file.is_file() and key not in done:
                record = json.loads(result_file.read_text())
                _append(results, record)
                done[key] = record
                print(f"done  {key}: eval_loss {record['eval_loss']:.4f} ({record['seconds']:.0f} s)", flush=True)
            elif key not in done:
                failed.add(key)
                print(f"FAILED {key}; log: {out / 'logs' / (key + '.log')}", flush=True)
        for spec in specs():
            if len(running) >= args.workers:
                break
            if spec.key in done or spec.key in running or spec.key in failed or not _ready(spec, done, out):
                continue
            print(f"start {spec.key} (~{spec.core_minutes():.1f} core-min)", flush=True)
            children[spec.key] = _launch(spec, out, *snapshots[spec.study])
            running.add(spec.key)
        if not running:
            break
        time.sleep(0.2 if args.quick else 3)
    missing = [s.key for s in specs() if s.key not in load_results(results)]
    if missing:
        print(f"{len(missing)} runs not finished (failed, or waiting on a failed parent): {', '.join(missing[:5])}")
        return 1
    return 0


def command_one(args) -> int:
    spec = Spec(**json.loads(args.spec))
    record = train(spec, Path(args.out))
    target = Path(args.result_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, target)
    return 0


def command_plan(args) -> int:
    done = load_results(Path(args.results))
    specs = full_plan(done)
    total = 0.0
    for study in STUDIES:
        todo = [s for s in specs if s.study == study and s.key not in done]
        cost = sum(s.core_minutes() for s in todo)
        total += cost
        print(f"{study}: {len(todo)} runs left of {sum(s.study == study for s in specs)}, ~{cost:.0f} core-minutes")
    print(f"total ~{total:.0f} core-minutes")
    return 0


def served_record(record: dict, out: Path) -> dict:
    """Export a saved QAT run with ``hf-cage export``'s defaults and evaluate the export as a user serves it.

    :func:`hf_cage.export.served.evaluate_served` (stock transformers without hf_cage for compressed-tensors
    exports, :func:`hf_cage.load_quantized` for the hf-cage format; token-weighted loss), on the validation blocks
    the training-time loss was measured on.
    """
    import torch

    from hf_cage.export import ExportError, export_checkpoint
    from hf_cage.export.served import evaluate_served

    spec = spec_of(record)
    export_dir = out / "exports" / spec.key
    common = dict(overwrite=True, progress=False, log=None)
    loss, loader, error, result = None, None, None, None
    try:
        result, how = export_checkpoint(out / "models" / spec.key, export_dir, **common), "default"
    except ExportError:  # the CLI's advice for what no format holds as trained: a lossy compressed-tensors export
        how = "--format compressed-tensors --allow-lossy"
        try:
            result = export_checkpoint(
                out / "models" / spec.key, export_dir, format="compressed-tensors", allow_lossy=True, **common
            )
        except ExportError as err:
            error = str(err)
    if result is not None:
        ids = torch.as_tensor(prepare_data(out, spec)[2].with_format("torch")[:]["input_ids"])
        served = evaluate_served(export_dir, ids, batch_size=32)
        loss, loader = served.loss, served.loader
    return {
        "key": spec.key,
        "study": spec.study,
        "method": spec.method,
        "fmt": spec.fmt,
        "seed": spec.seed,
        "steps": spec.steps,
        "hidden": spec.hidden,
        "lam": spec.lam,
        "silence": spec.silence,
        "export_format": result.format if result else None,
        "export_error": error,
        "export_options": how,
        "loader": loader,
        "eval_loss_trained": record["eval_loss"],
        "eval_loss_served": loss,
        "served_minus_trained": None if loss is None else loss - record["eval_loss"],
        "code_commit": os.environ.get("HF_CAGE_CODE_COMMIT"),
    }


def command_served(args) -> int:
    out, results = Path(args.out), Path(args.results)
    done = load_results(results)
    served_file = results / "served.jsonl"
    measured = set()
    if served_file.exists():
        measured = {json.loads(line)["key"] for line in served_file.read_text().splitlines() if line.strip()}
    todo = [
        r
        for r in done.values()
        if r.get("save")
        and r["method"] != "bf16"
        and r["key"] not in measured
        and (out / "models" / r["key"]).is_dir()
    ]
    for record in sorted(todo, key=lambda r: r["key"]):
        row = served_record(record, out)
        with open(served_file, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        served = row["eval_loss_served"]
        how = f"{served:.4f} ({row['export_format']}, {row['loader']})" if served is not None else "not exportable"
        print(f"{row['key']}: trained {row['eval_loss_trained']:.4f}, served {how}", flush=True)
    return 0


def load_served(results: Path) -> list[dict]:
    path = results / "served.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def served_table(rows: list[dict]) -> str:
    lines = [
        "| run | format | export | loaded by | eval loss, trained model | eval loss, served export | "
        "served - trained |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["fmt"], r["method"] != "ste", r["seed"], r["key"])):
        label = "STE" if r["method"] == "ste" else f"CAGE lambda {r['lam']:g}, silence {r['silence']:g}"
        if r["eval_loss_served"] is None:
            lines.append(
                f"| {label}, seed {r['seed']} ({r['study']}, {r['steps']} steps) | {r['fmt']} | not exportable: "
                f"{r['export_error']} | - | {r['eval_loss_trained']:.4f} | - | - |"
            )
            continue
        lines.append(
            f"| {label}, seed {r['seed']} ({r['study']}, {r['steps']} steps) | {r['fmt']} | "
            f"{r['export_format']} ({r['export_options']}) | "
            f"{r['loader']} | {r['eval_loss_trained']:.4f} | {r['eval_loss_served']:.4f} | "
            f"{r['served_minus_trained']:+.4f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Report


def _fmt_losses(values: list[float]) -> str:
    return " / ".join(f"{v:.4f}" for v in values)


def _mean(values):
    return statistics.mean(values) if values else float("nan")


def total_pull(steps: int, lr: float, lam: float, silence: float) -> float:
    """The correction's total pull ``sum_t lr_t * lambda_t`` of a run (transformers' own scheduler, CAGE's ramp)."""
    import torch
    from transformers import get_scheduler

    from hf_cage.optim.schedule import cage_lambda

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = get_scheduler(
        "cosine_with_min_lr",
        opt,
        num_warmup_steps=math.ceil(0.1 * steps),
        num_training_steps=steps,
        scheduler_specific_kwargs={"min_lr_rate": 0.1},
    )
    pull = 0.0
    for step in range(1, steps + 1):
        pull += sched.get_last_lr()[0] * cage_lambda(step, steps, lam, silence, "linear_ramp")
        opt.step()
        sched.step()
    return pull


def lambda_for_pull(steps: int, lr: float, pull: float, silence: float) -> float:
    """The ``cage_lambda`` whose total pull over the run is ``pull`` (the pull is linear in lambda). The one place
    the benchmark turns a pull into a lambda, until ``CAGEConfig`` takes the pull itself."""
    return pull / total_pull(steps, lr, 1.0, silence)


def paired_removed(triples: list[tuple[float, float, float]]) -> dict:
    """Per seed ``(bf16, ste, cage)`` losses -> the share of STE's loss increase over BF16 that CAGE removes:
    mean over the seeds where STE is worse than BF16, its standard error (n >= 2), and CAGE's wins over STE."""
    shares = [(s - c) / (s - b) for b, s, c in triples if s > b]
    se = statistics.stdev(shares) / math.sqrt(len(shares)) if len(shares) >= 2 else float("nan")
    wins = sum(c < s for _, s, c in triples)
    return {"mean": _mean(shares), "se": se, "n": len(shares), "wins": wins, "seeds": len(triples)}


def _removed_cell(stats: dict) -> str:
    if not stats["n"]:
        return "no increase to remove"
    se = f" ± {stats['se']:.1%}" if stats["se"] == stats["se"] else ""
    tail = f" (over {stats['n']} seeds)" if stats["n"] != stats["seeds"] else ""
    return f"**{stats['mean']:+.1%}**{se}{tail}"


def practical_triples(
    rows: list[dict], fmt: str, pull: float, silence: float = PRACTICAL_SILENCE, steps: int = PRACTICAL_STEPS
) -> list[tuple[int, float, float, float]]:
    """``(seed, bf16, ste, cage)`` for every seed where the three ``steps``-long fine-tuning runs of ``fmt`` at
    ``pull`` and ``silence`` (CAGE's) finished."""
    by = {
        (r["method"], spec_of(r).fmt, r.get("pull"), r["silence"], r["seed"]): r["eval_loss"]
        for r in rows
        if r["init"] and r["steps"] == steps
    }
    out = []
    for seed in sorted({r["seed"] for r in rows}):
        keys = (("bf16", "bf16", None, 0.0, seed), ("ste", fmt, None, 0.0, seed), ("cage", fmt, pull, silence, seed))
        if all(k in by for k in keys):
            out.append((seed, *(by[k] for k in keys)))
    return out


def practical_table(rows: list[dict]) -> str:
    """The fine-tuning table: per format, the paired share of STE's increase CAGE (at the sweep's pull) removes, its
    standard error, the seeds CAGE won, and the BF16-fine-tuned / STE / CAGE mean losses."""
    choice = practical_default(rows)
    cage = "CAGE" if choice is None else f"CAGE (total pull {choice:g}, silence {PRACTICAL_SILENCE:g})"
    lines = [
        "| fine-tuned into | steps | seeds | share of STE's loss increase CAGE removes (paired mean ± s.e.) | CAGE "
        f"wins / seeds | BF16 fine-tuned | STE | {cage} | STE's increase over BF16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if choice is None:
        return "\n".join(lines + ["| (no seed has the whole pull sweep yet: no default) | | | | | | | | |"])
    rows_at = [(fmt, PRACTICAL_STEPS, choice) for fmt in _practical_formats(rows)]
    long, long_pull = 3 * PRACTICAL_STEPS, best_pull(rows, 3 * PRACTICAL_STEPS)
    if long_pull is not None:  # the longer sweep, at its own best pull
        rows_at.insert(1, (_fmt_of({}), long, long_pull))
    for fmt, steps, pull in rows_at:
        triples = practical_triples(rows, fmt, pull, PRACTICAL_SILENCE, steps)
        if not triples:
            continue
        stats = paired_removed([t[1:] for t in triples])
        b, st, c = (_mean([t[i] for t in triples]) for i in (1, 2, 3))
        note = "" if pull == choice and steps == PRACTICAL_STEPS else f" (pull {pull:g}: that length's best)"
        lines.append(
            f"| {format_label(fmt)} | {steps} | {len(triples)} | {_removed_cell(stats)} | {stats['wins']} / "
            f"{stats['seeds']} | {b:.4f} | {st:.4f} | {c:.4f}{note} | {st - b:+.4f} |"
        )
    return "\n".join(lines)


def best_pull(rows: list[dict], steps: int) -> float | None:
    """The pull of the ``steps``-long sweep with the lowest mean CAGE loss over the seeds every pull has."""
    fmt = _fmt_of({})
    found = {p: practical_triples(rows, fmt, p, PRACTICAL_SILENCE, steps) for p in PRACTICAL_PULLS}
    if not all(found.values()):
        return None
    seeds = set.intersection(*({t[0] for t in ts} for ts in found.values()))
    if not seeds:
        return None
    return min(found, key=lambda p: _mean([t[3] for t in found[p] if t[0] in seeds]))


def practical_sweep_table(rows: list[dict]) -> str:
    """The pull sweep at ``PRACTICAL_SWEEP_FORMAT``: per silence and total pull, its lambda and the paired share
    removed."""
    fmt = _fmt_of({})
    choice = practical_default(rows)
    lines = [
        "| fine-tuning steps | silence | total pull sum_t lr_t lambda_t | lambda it takes | seeds | share of "
        "STE's loss increase CAGE removes (paired mean ± s.e.) | CAGE wins / seeds | CAGE eval loss (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    swept = {
        (r["steps"], r["silence"], r["pull"]) for r in rows if r.get("pull") is not None and spec_of(r).fmt == fmt
    }
    for steps, silence, pull in sorted(swept, key=lambda x: (x[0], x[1] != PRACTICAL_SILENCE, x)):
        triples = practical_triples(rows, fmt, pull, silence, steps)
        if not triples:
            continue
        stats = paired_removed([t[1:] for t in triples])
        lam = next(
            r["cage_lambda"]
            for r in rows
            if (r["steps"], r.get("pull"), r["silence"]) == (steps, pull, silence) and spec_of(r).fmt == fmt
        )
        chosen = (steps, pull, silence) == (PRACTICAL_STEPS, choice, PRACTICAL_SILENCE)
        mark = " (chosen)" if chosen else ""
        lines.append(
            f"| {steps} | {silence:g} | {pull:g}{mark} | {lam:.4g} | {len(triples)} | {_removed_cell(stats)} | "
            f"{stats['wins']} / {stats['seeds']} | {_mean([t[3] for t in triples]):.4f} |"
        )
    return "\n".join(lines)


def practical_default(rows: list[dict]) -> float | None:
    """The pull the fine-tuning table uses: :func:`practical_choice` over the leading seeds that have the whole
    sweep (all ``PRACTICAL_SEEDS`` once the study is done); None before the first."""
    done = {r["key"]: r for r in rows}
    seeds = 0
    while seeds < PRACTICAL_SEEDS and practical_choice(done, seeds + 1) is not None:
        seeds += 1
    return practical_choice(done, seeds) if seeds else None


def _practical_formats(rows: list[dict]) -> list[str]:
    order = [_fmt_of({"sweep_format": f}) for f in PRACTICAL_FORMATS]
    found = {spec_of(r).fmt for r in rows if r["method"] != "bf16"}
    return [f for f in order if f in found] + sorted(found - set(order))


def format_label(fmt: str) -> str:
    """``w4-int-g64`` -> ``W4A16 int, group 64``; ``w4-mxfp4`` -> ``W4A16 MXFP4``."""
    parts = fmt.split("-")
    bits = parts[0].upper() + ("" if "a" in parts[0] else "A16")
    grid = parts[1].upper() if parts[1].endswith("fp4") else parts[1]
    return f"{bits} {grid}" + (f", group {parts[2][1:]}" if len(parts) > 2 else "")


def pretrain_table(rows: list[dict]) -> str:
    """BF16 / STE / CAGE per format, per seed, with the share of the STE-to-BF16 gap closed (paired by seed)."""
    bf16 = {r["seed"]: r["eval_loss"] for r in rows if is_baseline(r)}
    lines = [
        "| run | format | seeds | eval loss (mean) | per seed | STE - CAGE (per seed) | share of STE-to-BF16 gap "
        "closed (mean, per seed) |",
        "|---|---|---|---|---|---|---|",
    ]
    if bf16:
        seeds = sorted(bf16)
        lines.append(
            f"| BF16 | - | {len(seeds)} | {_mean(bf16.values()):.4f} | {_fmt_losses([bf16[s] for s in seeds])} | | |"
        )
    for fmt in sorted({r["fmt_name"] for r in map(_with_fmt, rows) if r["method"] != "bf16"}, reverse=True):
        ste = {r["seed"]: r for r in map(_with_fmt, rows) if r["method"] == "ste" and r["fmt_name"] == fmt}
        if ste:
            seeds = sorted(ste)
            vals = [ste[s]["eval_loss"] for s in seeds]
            lines.append(f"| STE | {fmt} | {len(seeds)} | {_mean(vals):.4f} | {_fmt_losses(vals)} | | |")
        variants = sorted({(r["lam"], r["silence"], r["variant"]) for r in rows if r["method"] == "cage"})
        for lam, sil, variant in variants:
            cage = [
                r
                for r in map(_with_fmt, rows)
                if r["method"] == "cage"
                and r["fmt_name"] == fmt
                and (r["lam"], r["silence"], r["variant"]) == (lam, sil, variant)
            ]
            cage = sorted((r for r in cage if r["seed"] in ste), key=lambda r: r["seed"])
            if not cage:
                continue
            vals = [r["eval_loss"] for r in cage]
            diffs = [ste[r["seed"]]["eval_loss"] - r["eval_loss"] for r in cage]
            shares = [
                gap_closed(ste[r["seed"]]["eval_loss"], r["eval_loss"], paired_bf16(bf16, r["seed"])) for r in cage
            ]
            label = f"CAGE lambda {lam:g}, silence {sil:g}" + (", coupled" if variant == "coupled" else "")
            lines.append(
                f"| {label} | {fmt} | {len(cage)} | {_mean(vals):.4f} | {_fmt_losses(vals)} | "
                f"{' / '.join(f'{d:+.4f}' for d in diffs)} | {share_cell(shares)} |"
            )
    return "\n".join(lines)


def paired_bf16(bf16: dict[int, float], seed: int) -> float:
    """The BF16 loss a run of ``seed`` is measured against: the BF16 run of the same seed (same initialization
    and data order) where it was trained, else the BF16 mean."""
    return bf16.get(seed, _mean(bf16.values()))


def share_cell(shares: list[float]) -> str:
    """``mean (per seed)``; a seed where STE is not worse than BF16 has no gap to close and reads ``no gap``."""
    if any(x != x for x in shares):
        return "no gap (STE not worse than BF16): " + " / ".join("no gap" if x != x else f"{x:+.0%}" for x in shares)
    return f"{_mean(shares):+.1%} ({' / '.join(f'{x:+.0%}' for x in shares)})"


def _with_fmt(r: dict) -> dict:
    return {**r, "fmt_name": spec_of(r).fmt}


def spec_of(record: dict) -> Spec:
    """The ``Spec`` a result line was trained from (fields added later take their defaults)."""
    return Spec(**{k: record[k] for k in Spec.__dataclass_fields__ if k in record})


def is_baseline(r: dict) -> bool:
    """BF16 as the recipes train it (Trainer's own optimizer groups), not the weight-decay control."""
    return r["method"] == "bf16" and r.get("bf16_decay", "trainer") == "trainer"


def controls_table(done: dict[str, dict]) -> str:
    """The BF16 weight-decay control: Trainer's groups vs block-linear decay, and the gap CAGE closes against each."""
    lines = [
        "| study | tokens / block param | format | BF16 (Trainer's decay) | BF16 (block-linear decay) | STE | "
        "CAGE lambda 13, silence 0.5 | share closed vs Trainer's BF16 | share closed vs block-decay BF16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted((r for r in done.values() if r.get("bf16_decay", "trainer") != "trainer"), key=lambda r: r["key"]):
        base = spec_of({**c, "bf16_decay": "trainer"})
        if base.key not in done:
            continue
        for bits in (4, 3):
            ste = replace(base, method="ste", w_bits=bits, a_bits=bits)
            cage = replace(ste, method="cage", lam=13.0, silence=0.5)
            if ste.key not in done or cage.key not in done:
                continue
            b0, s0, c0 = (done[x.key]["eval_loss"] for x in (base, ste, cage))
            k = c["eval_loss"]
            lines.append(
                f"| {c['study']} (hidden {c['hidden']}) | {c['tokens_per_block_param']:.0f} | {ste.fmt} | {b0:.4f} | "
                f"{k:.4f} | {s0:.4f} | {c0:.4f} | {share_cell([gap_closed(s0, c0, b0)])} | "
                f"{share_cell([gap_closed(s0, c0, k)])} |"
            )
    return "\n".join(lines)


def gap_closed(ste: float, cage: float, bf16: float) -> float:
    """Share of the STE-to-BF16 gap that CAGE closes: 1 = CAGE reaches BF16, 0 = no better than STE."""
    gap = ste - bf16
    return (ste - cage) / gap if gap > 0 else float("nan")


def finetune_table(rows: list[dict]) -> str:
    """Fine-tuning: loss increase over the BF16 model fine-tuned the same way, and the share CAGE removes."""
    rows = [_with_fmt(r) for r in rows]
    bf16 = {r["seed"]: r["eval_loss"] for r in rows if is_baseline(r)}
    lines = [
        "| format | method | seeds | eval loss (mean) | per seed | increase over BF16 fine-tuned (mean) | "
        "share of STE's increase removed (mean, per seed) |",
        "|---|---|---|---|---|---|---|",
    ]
    if bf16:
        seeds = sorted(bf16)
        lines.append(
            f"| BF16 | fine-tuned | {len(seeds)} | {_mean(bf16.values()):.4f} | "
            f"{_fmt_losses([bf16[s] for s in seeds])} | | |"
        )
    for fmt in sorted({r["fmt_name"] for r in rows if r["method"] != "bf16"}, reverse=True):
        ste = {r["seed"]: r for r in rows if r["method"] == "ste" and r["fmt_name"] == fmt and r["seed"] in bf16}
        for method in ("ste", "cage"):
            variants = sorted(
                {(r["lam"], r["silence"]) for r in rows if r["method"] == method and r["fmt_name"] == fmt}
            )
            for lam, sil in variants:
                group = sorted(
                    (
                        r
                        for r in rows
                        if r["method"] == method
                        and r["fmt_name"] == fmt
                        and (r["lam"], r["silence"]) == (lam, sil)
                        and r["seed"] in bf16
                        and r["seed"] in ste
                    ),
                    key=lambda r: r["seed"],
                )
                if not group:
                    continue
                vals = [r["eval_loss"] for r in group]
                increases = [r["eval_loss"] - bf16[r["seed"]] for r in group]
                removed = ""
                label = "STE"
                if method == "cage":
                    label = f"CAGE lambda {lam:g}, silence {sil:g}"
                    shares = [
                        (ste[r["seed"]]["eval_loss"] - r["eval_loss"])
                        / (ste[r["seed"]]["eval_loss"] - bf16[r["seed"]])
                        for r in group
                    ]
                    removed = f"{_mean(shares):+.1%} ({' / '.join(f'{s:+.0%}' for s in shares)})"
                lines.append(
                    f"| {fmt} | {label} | {len(group)} | {_mean(vals):.4f} | {_fmt_losses(vals)} | "
                    f"{_mean(increases):+.4f} | {removed} |"
                )
    return "\n".join(lines)


def formats_rows(done: dict[str, dict], finetuning: bool) -> list[dict]:
    """The formats study's pretraining (or fine-tuning) runs with BF16 and QuEST W4A4 from ``pretrain`` (or
    ``finetune``): the same model, data, steps and seeds."""
    home = "finetune" if finetuning else "pretrain"
    rows = [_with_fmt(r) for r in done.values()]
    return [
        r
        for r in rows
        if (r["study"] == home and (is_baseline(r) or r["fmt_name"] == "w4a4-quest"))
        or (r["study"] == "formats" and (r["init"] is not None) == finetuning)
    ]


def map_points(done: dict[str, dict]) -> list[dict]:
    """Per (steps, format, CAGE setting): the share of the gap closed per seed (paired with STE and BF16)."""
    rows = [_with_fmt(r) for r in done.values() if r["study"] == "map"]
    bf16 = {(r["steps"], r["seed"]): r["eval_loss"] for r in rows if is_baseline(r)}
    ste = {(r["steps"], r["fmt_name"], r["seed"]): r["eval_loss"] for r in rows if r["method"] == "ste"}
    points: dict[tuple, dict] = {}
    for r in rows:
        if r["method"] != "cage":
            continue
        parent, base = (r["steps"], r["fmt_name"], r["seed"]), (r["steps"], r["seed"])
        if parent not in ste or base not in bf16:
            continue
        key = (r["steps"], r["fmt_name"], r["lam"], r["silence"], r["variant"])
        p = points.setdefault(
            key,
            {
                "steps": r["steps"],
                "fmt": r["fmt_name"],
                "lam": r["lam"],
                "silence": r["silence"],
                "variant": r["variant"],
                "setting": _setting(r),
                "tpp": r["tokens_per_block_param"],
                "shares": [],
                "cage": [],
                "ste": [],
                "bf16": [],
            },
        )
        p["shares"].append(gap_closed(ste[parent], r["eval_loss"], bf16[base]))
        p["cage"].append(r["eval_loss"])
        p["ste"].append(ste[parent])
        p["bf16"].append(bf16[base])
    return sorted(points.values(), key=lambda p: (p["fmt"], p["variant"], p["lam"], p["silence"], p["steps"]))


def map_table(done: dict[str, dict]) -> str:
    lines = [
        "| tokens / block param | format | CAGE setting | seeds | BF16 | STE | CAGE | STE - CAGE (per seed) | "
        "share of gap closed (mean, per seed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in map_points(done):
        setting = f"lambda {p['lam']:g}, silence {p['silence']:g}" + (", coupled" if p["variant"] == "coupled" else "")
        lines.append(
            f"| {p['tpp']:.0f} | {p['fmt']} | {setting} | {len(p['shares'])} | {_mean(p['bf16']):.4f} | "
            f"{_mean(p['ste']):.4f} | {_mean(p['cage']):.4f} | "
            f"{' / '.join(f'{s - c:+.4f}' for s, c in zip(p['ste'], p['cage']))} | {share_cell(p['shares'])} |"
        )
    return "\n".join(lines)


def _setting(r: dict) -> str:
    if (r["lam"], r["silence"]) == MAP_VARIANTS[0]:
        return f"lambda {r['lam']:g} fixed, silence {r['silence']:g}"
    return f"lambda scaled to a total pull of 2, silence {r['silence']:g}"


def plot_map(done: dict[str, dict], path: Path) -> bool:
    """Left: the STE-to-BF16 gap and CAGE's paired gain over STE, in nats; right: the share of the gap closed (where
    there is a gap). Per-seed points, lines through the means."""
    points = [p for p in map_points(done) if p["variant"] == "decoupled" and p["fmt"].endswith("quest")]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted({(p["fmt"], p["setting"]) for p in points})
    settings = sorted({p["setting"] for p in points})
    for fmt, setting in series:
        color = f"C{2 * settings.index(setting) + (0 if fmt.startswith('w4') else 1)}"
        ps = sorted((p for p in points if (p["fmt"], p["setting"]) == (fmt, setting)), key=lambda p: p["tpp"])
        xs = [p["tpp"] for p in ps]
        name = f"{fmt.split('-')[0].upper()}, {setting}"
        gains = [[s - c for s, c in zip(p["ste"], p["cage"])] for p in ps]
        left.plot(xs, [_mean(g) for g in gains], "-", marker="o", color=color, label=f"STE - CAGE: {name}")
        if setting == settings[0]:  # the gap does not depend on the CAGE setting: one line per format
            left.plot(
                xs,
                [_mean([s - b for s, b in zip(p["ste"], p["bf16"])]) for p in ps],
                ":",
                marker="x",
                color=color,
                label=f"STE - BF16 gap: {fmt.split('-')[0].upper()}",
            )
        shares = [(p["tpp"], 100 * _mean(p["shares"])) for p in ps if all(s == s for s in p["shares"])]
        if shares:
            right.plot(*zip(*shares), "-", marker="o", color=color, label=name)
        for p, g in zip(ps, gains):
            left.scatter([p["tpp"]] * len(g), g, s=8, color=color, alpha=0.5)
    # the headline (hidden 64) beside the map, as stars
    for bits, color in ((4, "C0"), (3, "C1")):
        heads = [
            (r, done.get(replace(spec_of(r), method="ste", lam=0.0, silence=0.0).key))
            for r in done.values()
            if r["study"] == "pretrain" and r["method"] == "cage" and r["w_bits"] == bits
        ]
        bf16 = {r["seed"]: r["eval_loss"] for r in done.values() if r["study"] == "pretrain" and is_baseline(r)}
        heads = [(r, ste) for r, ste in heads if ste is not None]
        for i, (r, ste) in enumerate(heads):
            label = f"hidden 64 headline, W{bits}A{bits} (per seed)" if i == 0 else "_nolegend_"
            left.scatter(
                [r["tokens_per_block_param"]],
                [ste["eval_loss"] - r["eval_loss"]],
                marker="*",
                s=60,
                color=color,
                label=f"STE - CAGE: {label}" if i == 0 else label,
            )
            share = gap_closed(ste["eval_loss"], r["eval_loss"], paired_bf16(bf16, r["seed"]))
            if share == share:
                right.scatter([r["tokens_per_block_param"]], [100 * share], marker="*", s=60, color=color, label=label)
    for ax in (left, right):
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlim(10, 200)
        ax.set_xlabel("training tokens per block parameter")
    right.axhline(15, color="gray", ls="--", lw=0.8, label="target: 15% of the gap")
    left.set_ylabel("nats (positive = CAGE better / STE worse)")
    right.set_ylabel("share of the STE-to-BF16 gap closed by CAGE (%)")
    left.set_title("Gap and CAGE's paired gain (hidden 32, QuEST)", fontsize=9)
    right.set_title("Share of the gap closed (where STE is worse than BF16)", fontsize=9)
    left.legend(fontsize=6)
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_practical_pull(rows: list[dict], path: Path) -> bool:
    """The pull sweep at ``PRACTICAL_SWEEP_FORMAT``: the paired share of STE's increase CAGE removes against the
    total pull, mean ± s.e. and per seed, one line per silence ratio."""
    fmt = _fmt_of({})
    series = {}
    for steps, silence, pull in sorted(
        {(r["steps"], r["silence"], r["pull"]) for r in rows if r.get("pull") is not None and spec_of(r).fmt == fmt}
    ):
        triples = [t[1:] for t in practical_triples(rows, fmt, pull, silence, steps)]
        if triples:
            shares = [(s - c) / (s - b) for b, s, c in triples if s > b]
            series.setdefault((steps, silence), []).append((pull, paired_removed(triples), shares))
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, ((steps, silence), points) in enumerate(sorted(series.items())):
        color = f"C{i}"
        for pull, _, shares in points:
            ax.scatter([pull] * len(shares), [100 * x for x in shares], s=10, color=color, alpha=0.4)
        seeds = max(st["seeds"] for _, st, _ in points)
        ax.errorbar(
            [p for p, _, _ in points],
            [100 * st["mean"] for _, st, _ in points],
            yerr=[100 * st["se"] if st["se"] == st["se"] else 0 for _, st, _ in points],
            fmt="-o",
            color=color,
            capsize=3,
            label=f"{steps} steps, silence {silence:g}: paired mean ± s.e. ({seeds} seeds)",
        )
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("CAGE total pull sum_t lr_t lambda_t")
    ax.set_ylabel("share of STE's loss increase removed (%)")
    ax.set_title(f"Fine-tuning into {format_label(fmt)}: CAGE strength", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def command_report(args) -> int:
    results = Path(args.results)
    done = load_results(results)
    if not done:
        print(f"no finished runs in {results}; run `python benchmarks/accuracy.py run` first", file=sys.stderr)
        return 2

    def study(name: str) -> list[dict]:
        return [r for r in done.values() if r["study"] == name]

    has_formats = bool(study("formats"))
    sections = {
        "practical": practical_table(study("practical")) if study("practical") else "",
        "practical-sweep": practical_sweep_table(study("practical")) if study("practical") else "",
        "pretrain": pretrain_table(study("pretrain")) if study("pretrain") else "",
        "finetune": finetune_table(study("finetune")) if study("finetune") else "",
        "formats-pretrain": pretrain_table(formats_rows(done, finetuning=False)) if has_formats else "",
        "formats-finetune": finetune_table(formats_rows(done, finetuning=True)) if has_formats else "",
        "map": map_table(done) if any(r["study"] == "map" for r in done.values()) else "",
        "served": served_table(load_served(results)) if load_served(results) else "",
        "controls": controls_table(done)
        if any(not is_baseline(r) and r["method"] == "bf16" for r in done.values())
        else "",
    }
    for name, table in sections.items():
        if table:
            print(f"## {name}\n{table}\n")
    docs = Path(args.docs)
    plot = docs / "regime_map.png" if args.write_docs else Path(args.out) / "regime_map.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    if plot_map(done, plot):
        print(f"plot: {plot}")
    pull_plot = plot.with_name("practical_pull.png")
    if plot_practical_pull(study("practical"), pull_plot):
        print(f"plot: {pull_plot}")
    if args.write_docs:
        target = docs / "results.md"
        text = target.read_text() if target.exists() else ""
        for name, table in sections.items():
            if table:
                text = replace_block(text, name, table)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
        print(f"wrote {target}")
    return 0


def replace_block(text: str, name: str, body: str) -> str:
    """Put ``body`` between the ``<!-- {name}-table -->`` markers of ``text`` (appended if absent)."""
    marker = f"<!-- {name}-table -->"
    block = f"{marker}\n{body}\n{marker}"
    if text.count(marker) >= 2:
        head, _, rest = text.partition(marker)
        _, _, tail = rest.partition(marker)
        return head + block + tail
    return text.rstrip("\n") + "\n\n" + block + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the runs that are not finished yet")
    run.add_argument(
        "--out", default="outputs/accuracy", help="checkpoints, models and logs (default: outputs/accuracy)"
    )
    run.add_argument("--results", default=str(RESULTS), help="results folder (default: benchmarks/results)")
    run.add_argument("--workers", type=int, default=2, help="training processes at a time (default: 2)")
    run.add_argument(
        "--study", default=None, help=f"comma-separated studies to run (default: all: {', '.join(STUDIES)})"
    )
    run.add_argument("--only", default=None, help="comma-separated substrings of run keys to train")
    run.add_argument("--quick", action="store_true", help="a seconds-long smoke run of the whole pipeline")
    run.add_argument(
        "--code-commit",
        default="HEAD",
        help="train with hf_cage at this commit (default: HEAD), or per study: pretrain=SHA,map=SHA",
    )
    run.set_defaults(func=command_run)
    one = sub.add_parser("one", help="train one run (used by `run`)")
    one.add_argument("--spec", required=True)
    one.add_argument("--out", required=True)
    one.add_argument("--result-file", required=True)
    one.set_defaults(func=command_one)
    served = sub.add_parser("served", help="export the saved QAT runs and measure the served loss")
    served.add_argument("--out", default="outputs/accuracy")
    served.add_argument("--results", default=str(RESULTS))
    served.set_defaults(func=command_served)
    plan = sub.add_parser("plan", help="runs left and their cost")
    plan.add_argument("--results", default=str(RESULTS))
    plan.set_defaults(func=command_plan)
    report = sub.add_parser("report", help="print the tables and draw the plot from finished runs")
    report.add_argument("--results", default=str(RESULTS))
    report.add_argument("--out", default="outputs/accuracy")
    report.add_argument("--docs", default=str(REPO / "docs"), help="where --write-docs writes (default: docs/)")
    report.add_argument("--write-docs", action="store_true", help="write the tables into DOCS/results.md and the plot")
    report.set_defaults(func=command_report)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

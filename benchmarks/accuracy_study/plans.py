"""The studies' runs in priority order; a plan may read finished results to choose what comes next."""

from __future__ import annotations

from dataclasses import replace

from .spec import QUICK, STUDIES, Spec
from .stats import mean

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


def finetune_spec(method: str, seed: int, fmt: tuple = (4, 4, "quest", None), study: str = "finetune", **kw) -> Spec:
    w, a, quantizer, group = fmt
    common = dict(steps=FT_STEPS, lr=FT_LR, init=finetune_base().key, data_seed=1000 + seed)
    if method == "bf16":
        return Spec(study, "bf16", seed, **common)
    return Spec(study, method, seed, w_bits=w, a_bits=a, quantizer=quantizer, group=group, **common, **kw)


def plan_finetune_sweep() -> list[Spec]:
    return [finetune_spec("cage", 0, lam=lam, silence=sil) for lam, sil in FT_SWEEP]


def plan_finetune(results: dict[str, dict], seeds: int = 3) -> list[Spec]:
    choice = finetune_choice(results)
    runs = [finetune_spec("bf16", 0), finetune_spec("ste", 0), *plan_finetune_sweep()]
    for seed in range(seeds):
        runs.append(finetune_spec("bf16", seed))
        for fmt in FT_FORMATS:
            runs.append(finetune_spec("ste", seed, fmt))
            if choice is not None:
                runs.append(finetune_spec("cage", seed, fmt, lam=choice[0], silence=choice[1]))
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
            runs.append(finetune_spec("ste", seed, fmt, study="formats", save=seed == 0))
            if choice is not None:
                cage = dict(lam=choice[0], silence=choice[1], save=seed == 0)
                runs.append(finetune_spec("cage", seed, fmt, study="formats", **cage))
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
    sweep = format_key(plan.get("sweep_format", PRACTICAL_SWEEP_FORMAT))
    runs = [s for s in plan_practical({}, seeds, **plan) if s.pull is not None and s.fmt == sweep]
    runs = [s for s in runs if s.silence == PRACTICAL_SILENCE and s.steps == plan.get("steps", PRACTICAL_STEPS)]
    if any(s.key not in results for s in runs):
        return None
    return min(PRACTICAL_PULLS, key=lambda p: mean([results[s.key]["eval_loss"] for s in runs if s.pull == p]))


def format_key(fmt: tuple = PRACTICAL_SWEEP_FORMAT) -> str:
    """The ``Spec.fmt`` of a ``(w_bits, a_bits, quantizer, group)`` format (default: the practical sweep's)."""
    w, a, quantizer, group = fmt
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
    ``PRACTICAL_LONG_PULL`` in every format, then the sweep; then per seed STE and CAGE at the sweep's choice (once
    made) in the other formats; last, the sweep at CAGEConfig's default silence. A seed is a fine-tuning seed (the
    Trainer's seed and the data order) from the same base; every CAGE run branches from the STE run of its seed and
    format."""
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
    """The runs of ``studies`` in priority order (docs/benchmarks.md), each key once: the practical study, then
    one of each of the other studies first (seed 0), the other seeds after; ``results`` settles the sweeps'
    choices."""
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

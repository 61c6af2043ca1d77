"""The studies' runs, the results file, and the ``run`` command."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from .problems import (
    CAGE_RUNS,
    KAPPAS,
    LR,
    LR_SCALES,
    MAIN_PULL,
    PULLS,
    QUANTIZERS,
    RESULTS,
    SHORT_PULLS,
    SILENCES,
    STE_RUNS,
    Run,
)
from .training import train


def plan_main() -> list[Run]:
    runs = []
    for quantizer in QUANTIZERS:
        for kappa in KAPPAS:
            for opt, variant in STE_RUNS + CAGE_RUNS:
                pull = 0.0 if variant == "ste" else MAIN_PULL[opt]
                runs.append(Run("main", quantizer, kappa, opt, variant, pull=pull, curve=True))
    return runs


def plan_tune() -> list[Run]:
    """The full pull sweep on other seeds (100-109), absmax: where ``MAIN_PULL`` was chosen."""
    seeds = tuple(range(100, 110))
    ste = [Run("tune", "absmax", kappa, opt, variant, seeds=seeds) for kappa in KAPPAS for opt, variant in STE_RUNS]
    return ste + [
        Run("tune", "absmax", kappa, opt, variant, pull=pull, seeds=seeds)
        for kappa in KAPPAS
        for opt, variant in CAGE_RUNS
        for pull in PULLS
    ]


def plan_pull() -> list[Run]:
    """The pull sweep for the hf-cage ``int`` and ``quest`` quantizers, seeds 0-9 (absmax: ``tune``)."""
    return [
        Run("pull", quantizer, kappa, opt, variant, pull=pull)
        for quantizer in ("int", "quest")
        for kappa in KAPPAS
        for opt, variant in CAGE_RUNS
        for pull in SHORT_PULLS
        if pull != MAIN_PULL[opt]
    ]


def plan_silence() -> list[Run]:
    """Absmax, silence ratio 0-0.9 at the main pull and a tenth of it (the SGD-coupled twin left out)."""
    return [
        Run("silence", "absmax", kappa, opt, variant, pull=pull, silence=silence)
        for kappa in KAPPAS
        for opt, variant in CAGE_RUNS
        if (opt, variant) != ("sgd", "coupled")
        for pull in (MAIN_PULL[opt] / 10, MAIN_PULL[opt])
        for silence in SILENCES
        if (pull, silence) != (MAIN_PULL[opt], 0.5)
    ]


def plan_lr() -> list[Run]:
    """Absmax, the main pull at a third of and three times the peak LR (lambda moves the other way), with STE at
    the same LR: is the pull or lambda what sets the gain?"""
    runs = []
    for kappa in KAPPAS:
        for scale in LR_SCALES:
            for opt, variant in STE_RUNS + CAGE_RUNS:
                if (opt, variant) != ("sgd", "coupled"):
                    pull = 0.0 if variant == "ste" else MAIN_PULL[opt]
                    runs.append(Run("lr", "absmax", kappa, opt, variant, pull=pull, lr=LR[opt] * scale))
    return runs


def plan_small() -> list[Run]:
    """d 4 (the best grid point by enumeration), every quantizer and kappa; the SGD-coupled twin left out."""
    return [
        replace(run, study="small", d=4, curve=False)
        for run in plan_main()
        if (run.optimizer, run.variant) != ("sgd", "coupled")
    ]


PLANS = {
    "main": plan_main,
    "small": plan_small,
    "silence": plan_silence,
    "lr": plan_lr,
    "pull": plan_pull,
    "tune": plan_tune,
}


def load_results(path: Path = RESULTS) -> dict[str, dict]:
    if not path.exists():
        return {}
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["key"]: r for r in records}


def command_run(args) -> int:
    import torch

    torch.set_num_threads(1)
    path = Path(args.results)
    done = load_results(path)
    studies = list(PLANS) if args.study == "all" else [args.study]
    todo = [run for study in studies for run in PLANS[study]() if run.key not in done]
    print(f"{len(todo)} runs to do ({len(done)} done) -> {path}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    for i, run in enumerate(todo):
        record = train(run)
        with path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"[{i + 1}/{len(todo)}] {run.key}: {statistics.mean(record['final']):.3e} ({record['seconds']} s)")
        sys.stdout.flush()
    return 0

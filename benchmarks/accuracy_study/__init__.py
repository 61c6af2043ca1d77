"""The accuracy benchmark (docs/benchmarks.md): BF16 vs STE vs CAGE trained through ``CAGEConfig`` + ``CAGETrainer``.

``spec`` (one run and its key), ``plans`` (the studies, in priority order), ``run`` (one run through the Trainer),
``orchestrate`` (runs in processes, the results files), ``served``, ``stats`` / ``tables`` / ``practical`` /
``report`` (tables, plots, docs/results.md) and ``cli``; ``benchmarks/accuracy.py`` is the command.
"""

from .cli import main
from .orchestrate import append_result, code_snapshot, load_results
from .plans import (
    PRACTICAL_LONG_PULL,
    PRACTICAL_PULLS,
    PRACTICAL_SILENCE,
    PRACTICAL_SILENCE_DEFAULT,
    PRACTICAL_STEPS,
    finetune_base,
    full_plan,
    plan_practical,
    practical_choice,
    quick_plan,
)
from .practical import plot_practical_pull, practical_default, practical_sweep_table, practical_table
from .run import checkpoint_dir, train, training_args
from .served import load_served, served_record, served_table
from .spec import BRANCH_POINTS, QUICK, STUDIES, Spec, lambda_for_pull, spec_of, total_pull
from .stats import gap_closed
from .tables import share_cell

__all__ = [
    "BRANCH_POINTS",
    "PRACTICAL_LONG_PULL",
    "PRACTICAL_PULLS",
    "PRACTICAL_SILENCE",
    "PRACTICAL_SILENCE_DEFAULT",
    "PRACTICAL_STEPS",
    "QUICK",
    "STUDIES",
    "Spec",
    "append_result",
    "checkpoint_dir",
    "code_snapshot",
    "finetune_base",
    "full_plan",
    "gap_closed",
    "lambda_for_pull",
    "load_results",
    "load_served",
    "main",
    "plan_practical",
    "plot_practical_pull",
    "practical_choice",
    "practical_default",
    "practical_sweep_table",
    "practical_table",
    "quick_plan",
    "served_record",
    "served_table",
    "share_cell",
    "spec_of",
    "total_pull",
    "train",
    "training_args",
]

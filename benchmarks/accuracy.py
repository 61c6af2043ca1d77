"""Accuracy benchmark through the product: BF16 vs STE vs CAGE, trained with ``CAGEConfig`` + ``CAGETrainer``.

The studies (practical, pretrain, finetune, map, formats) and how their runs are built are described in
docs/benchmarks.md; the code is the ``accuracy_study`` package beside this file. One results file per study under
``--results``, one JSON line per finished run; finished runs are skipped, so every command resumes. Runs train with
``hf_cage`` as committed (a snapshot under OUT/code, ``--code-commit``), and each result records that commit.

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

import sys

from accuracy_study.cli import main

if __name__ == "__main__":
    sys.exit(main(doc=__doc__))

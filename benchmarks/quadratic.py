"""CAGE against STE on the paper's synthetic quantized quadratics (CAGE section 4.1), through the product.

Minimise ``f(Q(x))`` for ``f(y) = 1/2 (y - x*)^T A (y - x*)`` with ``Q`` a 4-bit weight quantizer of hf-cage
(``absmax``, ``int`` or ``quest``), STE against ``hf_cage.CAGECorrection`` on ``torch.optim.SGD`` / ``Adam``; the
problems, the best grid point and the studies (main, tune, pull, silence, lr, small: 348 runs, about 14 CPU minutes
on one thread) are described in docs/results.md. The code is the ``quadratic_study`` package beside this file; one
JSON line per run in ``benchmarks/results/quadratic.jsonl``, finished runs are skipped, so every command resumes.

    # everything not yet done, one torch thread, in the background:
    OMP_NUM_THREADS=1 nohup python benchmarks/quadratic.py run > quadratic.log 2>&1 &
    python benchmarks/quadratic.py run --study main        # one study
    python benchmarks/quadratic.py report --plot docs/quadratic.png   # tables (markdown) + the figure
"""

import sys

from quadratic_study.cli import main

if __name__ == "__main__":
    sys.exit(main(doc=__doc__))

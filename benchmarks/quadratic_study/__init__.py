"""The synthetic quantized quadratics (``benchmarks/quadratic.py``): ``problems`` (a run and its problems),
``training``, ``grid`` (the best grid point), ``plans`` (the studies, the ``run`` command), ``tables`` / ``report``
and ``cli``."""

from .cli import main
from .plans import PLANS, load_results
from .problems import Run
from .training import lambda_for, pull_per_lambda, train

__all__ = ["PLANS", "Run", "lambda_for", "load_results", "main", "pull_per_lambda", "train"]

"""One quadratics run (:class:`Run`) and its problems: ``f(y) = 1/2 (y - x*)^T A (y - x*)`` per seed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results" / "quadratic.jsonl"

QUANTIZERS = {
    "absmax": dict(quantizer="int", clip="absmax"),
    "int": dict(quantizer="int"),
    "quest": dict(quantizer="quest"),
}
KAPPAS = (1, 10, 100)
LR = {"sgd": 0.5, "adam": 1e-2}
# CAGE runs: (optimizer, variant); STE is variant "ste".
CAGE_RUNS = (("sgd", "decoupled"), ("sgd", "coupled"), ("adam", "decoupled"), ("adam", "coupled"))
STE_RUNS = (("sgd", "ste"), ("adam", "ste"))
MAIN_PULL = {"sgd": 30.0, "adam": 3.0}  # from the ``tune`` sweep (seeds 100-109)
PULLS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
SILENCES = (0.0, 0.25, 0.5, 0.75, 0.9)
SHORT_PULLS = (0.3, 3.0, 30.0)
LR_SCALES = (1 / 3, 3.0)
CURVE_POINTS = 100


@dataclass(frozen=True)
class Run:
    """One run: ``len(seeds)`` independent problems trained together (one row each)."""

    study: str
    quantizer: str
    kappa: float
    optimizer: str
    variant: str  # "ste", "decoupled" or "coupled"
    pull: float = 0.0  # total pull sum_t lr_t * lambda_t (0 for STE); lambda is derived from it
    silence: float = 0.5
    d: int = 256
    steps: int = 2000
    seeds: tuple[int, ...] = tuple(range(10))
    lr: float | None = None  # None: LR[optimizer]
    curve: bool = False

    @property
    def peak_lr(self) -> float:
        return LR[self.optimizer] if self.lr is None else self.lr

    @property
    def key(self) -> str:
        seeds = f"{self.seeds[0]}-{self.seeds[-1]}" if len(self.seeds) > 1 else str(self.seeds[0])
        return (
            f"{self.study}/{self.quantizer}/k{self.kappa:g}/{self.optimizer}-{self.variant}/p{self.pull:g}"
            f"/s{self.silence:g}/d{self.d}/T{self.steps}/lr{self.peak_lr:g}/seeds{seeds}"
        )


def weight_spec(quantizer: str, d: int):
    """hf-cage's 4-bit weight grid of a ``d``-wide row for ``quantizer`` (a key of ``QUANTIZERS``)."""
    from hf_cage import QuantConfig

    return QuantConfig(w_bits=4, a_bits=None, **QUANTIZERS[quantizer]).weight_spec(d)


def problem(seed: int, d: int, kappa: float):
    """``(A, x_star, x0)`` in float64 for one seed (module docstring); ``A`` has eigenvalues in [1/kappa, 1]."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    u, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    u = u * torch.sign(torch.diagonal(r))  # Haar-distributed
    x_star = torch.randn(d, generator=gen, dtype=torch.float64)
    x0 = torch.randn(d, generator=gen, dtype=torch.float64)
    if kappa == 1:
        return torch.eye(d, dtype=torch.float64), x_star, x0
    ev = torch.logspace(0, -math.log10(kappa), d, dtype=torch.float64)
    a = (u * ev) @ u.T
    return (a + a.T) / 2, x_star, x0


def objective(a, x_star):
    """``(f, grad f)`` row by row for stacked ``A`` (S, d, d) and ``x*`` (S, d): ``f(y) = 1/2 (y - x*)^T A (y - x*)``,
    ``(S, d) -> (S,)``, and its gradient ``A (y - x*)``, ``(S, d) -> (S, d)``."""
    import torch

    def gradient(y):  # (y - x*)^T A = (A (y - x*))^T: A is symmetric; the row form is 7x faster on CPU
        return torch.bmm((y - x_star).unsqueeze(1), a).squeeze(1)

    def f(y):
        return 0.5 * ((y - x_star) * gradient(y)).sum(-1)

    return f, gradient

"""CAGE against STE on the paper's synthetic quantized quadratics (CAGE section 4.1), through the product.

Minimise ``f(Q(x))`` for ``f(y) = 1/2 (y - x*)^T A (y - x*)`` over ``x`` in R^d, with ``Q`` a 4-bit weight
quantizer of hf-cage applied to ``x`` as one row (one scale for the whole vector):

- ``absmax``: the per-tensor absmax integer grid, ``QuantConfig(quantizer="int", clip="absmax")``: codes
  -7..7, step ``max|x| / 7``;
- ``int``: hf-cage's ``int`` weight quantizer (codes -8..7, clip ``alpha_4 * RMS(x)``);
- ``quest``: hf-cage's ``quest`` weight quantizer (Hadamard rotation in blocks of 128, mid-rise grid, clip
  ``alpha_4 * RMS``).

Every run goes through the product: the forward is ``hf_cage.quant.fake_quantize_ste`` (the STE with QuEST's trust
mask, as in ``QATLinear``), the optimizer is ``torch.optim.SGD`` or ``torch.optim.Adam`` (betas 0.9, 0.95) with
transformers' ``cosine_with_min_lr`` schedule (10% warmup, cosine to 10% of the peak, the presets' schedule), and
CAGE is ``hf_cage.CAGECorrection(optimizer, weight_quantizers={x: Q}, ...)`` (decoupled or coupled, the
``linear_ramp`` schedule). STE is the same run without the correction. Ten seeds run as ten rows of one parameter:
the optimizers and the correction act elementwise and ``Q`` per row, so every row is an independent problem.

Problems (seed ``s``): ``A = U diag(ev) U^T`` with ``U`` a random orthogonal matrix and ``ev`` log-spaced from 1 down
to ``1 / kappa`` (``A = I`` at kappa 1), ``x* ~ N(0, I)``, start ``x0 ~ N(0, I)``; the same ``U``, ``x*``, ``x0`` for
every method and kappa, so every CAGE / STE comparison is paired. Reported: ``f(Q(x_T)) / f(0)``.

The best grid point. ``Q``'s scale depends on ``x`` (max or RMS of the row), so there is no fixed grid: the points
``Q`` can output are ``t * v`` for any scale ``t > 0`` and any code vector ``v`` (in the rotated basis for
``quest``) that some ``x`` with that scale rounds to. A code vector is reachable iff its rounding box (the ``u`` with
``round(u) = v``, unbounded at clamped codes) holds a point of the norm the scale rule fixes: ``max|u| = 7`` for
absmax, ``||u||_2 = sqrt(d) * 15 / (2 alpha_4)`` for the RMS rules; every ``t > 0`` then is reachable too. The best
grid point is ``argmin f`` over that set, the true optimum of ``min_x f(Q(x))``:

- ``small``: at d = 4 by brute force over all 15^4 / 16^4 code vectors (for each, the least-squares ``t``): exact at
  every kappa;
- at kappa 1 (``A = I``) and any d, by a scan over ``t``: for a fixed ``t`` the best codes are the per-coordinate
  nearest ones, which change only at ``t = x*_i / m`` (``m`` a midpoint between grid values); the best reachable
  candidate is exact when the best candidate overall is reachable (recorded as ``best_exact``; the unconstrained
  minimum is a lower bound).

Studies (one JSON line per run in ``benchmarks/results/quadratic.jsonl``; finished runs are skipped, so every
command resumes):

- ``main``: d 256, 2000 steps, kappa 1 / 10 / 100, seeds 0-9, the three quantizers; STE-SGD, STE-Adam and CAGE with
  SGD and with Adam, decoupled and coupled, at the total pull ``sum_t lr_t lambda_t`` of ``MAIN_PULL``, silence 0.5
  (loss curves kept for the plot);
- ``tune``: absmax, the total pull swept from 0.1 to 100 (the lambda sweep) on seeds 100-109, where ``MAIN_PULL``
  was chosen;
- ``pull``: ``int`` and ``quest`` at pulls 0.3 / 3 / 30, seeds 0-9;
- ``silence``: absmax, silence ratio 0 / 0.25 / 0.5 / 0.75 / 0.9 at the main pull and a tenth of it;
- ``lr``: absmax, the main pull at a third of and three times the peak LR (lambda the other way), with STE there;
- ``small``: d 4, every quantizer and kappa, against the brute-force best grid point.

All of it: 348 runs, about 14 CPU minutes on one thread (the best grid points included).

    # everything not yet done, one torch thread, in the background:
    OMP_NUM_THREADS=1 nohup python benchmarks/quadratic.py run > quadratic.log 2>&1 &
    python benchmarks/quadratic.py run --study main        # one study
    python benchmarks/quadratic.py report --plot docs/quadratic.png   # tables (markdown) + the figure
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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


# ----------------------------------------------------------------------------------------------- problems


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


# ------------------------------------------------------------------------------------------------ training


def make_scheduler(optimizer, steps: int):
    """The presets' LR schedule: transformers' ``cosine_with_min_lr``, 10% warmup, cosine to 10% of the peak."""
    from transformers import get_scheduler

    return get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        num_warmup_steps=math.ceil(0.1 * steps),
        num_training_steps=steps,
        scheduler_specific_kwargs={"min_lr_rate": 0.1},
    )


def pull_per_lambda(steps: int, lr: float, silence: float) -> float:
    """``sum_t lr_t * lambda_t / lambda``: the total pull a run of this schedule gets per unit of lambda."""
    import torch

    from hf_cage.optim.schedule import cage_lambda

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make_scheduler(opt, steps)
    total = 0.0
    for step in range(1, steps + 1):
        total += sched.get_last_lr()[0] * cage_lambda(step, steps, 1.0, silence, "linear_ramp")
        opt.step()
        sched.step()
    return total


def lambda_for(run: Run) -> float:
    """The ``cage_lambda`` that gives ``run`` its total pull."""
    return 0.0 if run.variant == "ste" else run.pull / pull_per_lambda(run.steps, run.peak_lr, run.silence)


def _curve_steps(steps: int) -> list[int]:
    return sorted({0, *(round(steps * i / CURVE_POINTS) for i in range(1, CURVE_POINTS + 1))})


def train(run: Run) -> dict:
    """Train ``run`` through the product (module docstring); the result record (final ``f(Q(x_T)) / f(0)`` per seed,
    the best grid point where known, the loss curve if ``run.curve``)."""
    import torch

    from hf_cage import CAGECorrection, kernels
    from hf_cage.quant import fake_quantize_ste

    start = time.process_time()
    spec = weight_spec(run.quantizer, run.d)
    problems = [problem(s, run.d, run.kappa) for s in run.seeds]
    a = torch.stack([p[0] for p in problems]).float()
    x_star = torch.stack([p[1] for p in problems]).float()
    x = torch.nn.Parameter(torch.stack([p[2] for p in problems]).float())
    f, gradient = objective(a, x_star)
    f0 = f(torch.zeros_like(x_star))

    def quantize(w):
        return kernels.fake_quantize(w, spec)[0]

    if run.optimizer == "adam":
        opt = torch.optim.Adam([x], lr=run.peak_lr, betas=(0.9, 0.95))
    elif run.optimizer == "sgd":
        opt = torch.optim.SGD([x], lr=run.peak_lr)
    else:
        raise ValueError(f"optimizer={run.optimizer!r} is not supported; use 'sgd' or 'adam'")
    lam = lambda_for(run)
    if run.variant != "ste":
        CAGECorrection(
            opt,
            weight_quantizers={x: quantize},
            cage_lambda=lam,
            cage_silence_ratio=run.silence,
            cage_variant=run.variant,
            total_steps=run.steps,
        )
    sched = make_scheduler(opt, run.steps)
    logged = set(_curve_steps(run.steps)) if run.curve else set()
    curve = []

    def ratio() -> list[float]:
        with torch.no_grad():
            return (f(quantize(x.detach())) / f0).tolist()

    for step in range(run.steps + 1):
        if step in logged:
            curve.append(ratio())
        if step == run.steps:
            break
        opt.zero_grad(set_to_none=True)
        y = fake_quantize_ste(x, spec)
        with torch.no_grad():
            grad_y = gradient(y)
        (y * grad_y).sum().backward()  # d/dx through the STE of f's gradient at Q(x): one matvec a step
        opt.step()
        sched.step()
    final = ratio()
    with torch.no_grad():
        rtn = (f(quantize(x_star)) / f0).tolist()
    record = {**asdict(run), "key": run.key, "lam": lam, "lr": run.peak_lr, "final": final, "rtn": rtn}
    if run.curve:
        record["curve_steps"], record["curve"] = sorted(logged), curve
    record.update(best_points(run, problems, x.detach()))
    record["seconds"] = round(time.process_time() - start, 2)  # CPU time (one thread)
    return record


# -------------------------------------------------------------------------------------- best grid point


def grid_geometry(spec, d: int):
    """``(values, lo, hi, norm, target)`` of a scale-from-the-row grid, in units of its step: the code values,
    each value's rounding interval ``[lo, hi]`` (infinite at clamped codes), and the norm (``"linf"`` / ``"l2"``)
    the scale rule fixes for ``u = x / step`` at ``target``."""
    import torch

    inf = math.inf
    if spec.group_size is not None or spec.bits != 4:
        raise ValueError("the best grid point is computed for 4-bit per-row grids only")
    if spec.grid == "int" and spec.scale_rule == "absmax":
        values = torch.arange(-7.0, 8.0, dtype=torch.float64)
        return values, (values - 0.5).clamp_min(-7), (values + 0.5).clamp_max(7), "linf", 7.0
    if spec.scale_rule != "mse":
        raise ValueError(f"scale rule {spec.scale_rule!r} is not covered here; use absmax or mse")
    target = math.sqrt(d) * 15 / (2 * spec.clip_alpha)
    if spec.grid == "int":
        values = torch.arange(-8.0, 8.0, dtype=torch.float64)
    elif spec.grid == "quest":
        values = torch.arange(-7.5, 8.0, dtype=torch.float64)
    else:
        raise ValueError(f"grid {spec.grid!r} is not covered here")
    lo, hi = values - 0.5, values + 0.5
    lo[0], hi[-1] = -inf, inf
    return values, lo, hi, "l2", target


def reachable(idx, geometry):
    """Which code vectors (rows of indices into ``values``) some ``x`` rounds to (module docstring)."""
    import torch

    _, lo, hi, norm, target = geometry
    low, high = lo[idx], hi[idx]
    near = torch.where((low <= 0) & (high >= 0), torch.zeros_like(low), torch.minimum(low.abs(), high.abs()))
    far = torch.maximum(low.abs(), high.abs())
    if norm == "linf":
        smallest, largest = near.amax(-1), far.amax(-1)
    else:
        smallest, largest = near.square().sum(-1).sqrt(), far.square().sum(-1).sqrt()
    return (smallest <= target) & (largest >= target)


def rotation(spec, d: int):
    """The grid's rotation as a dense float64 ``(d, d)`` matrix (block-diagonal Hadamard, symmetric), or ``I``."""
    import torch

    from hf_cage import kernels

    if not spec.hadamard_block:
        return torch.eye(d, dtype=torch.float64)
    block = kernels.reference.hadamard_matrix(spec.hadamard_block).double()
    return torch.block_diag(*[block] * (d // spec.hadamard_block))


def _best_of(v, a, x_star, geometry):
    """Over candidate code vectors ``v`` (N, d; rotated basis), each at its least-squares scale: the best reachable
    one, ``(f_best, codes_best, scale_best, f_lower_bound, exact)`` (``exact``: the best candidate is reachable)."""
    import torch

    av = v @ a
    num, den = av @ x_star, (av * v).sum(-1)
    f0 = 0.5 * x_star @ a @ x_star
    gain = torch.where(num > 0, 0.5 * num.square() / den.clamp_min(1e-300), torch.zeros_like(num))
    values = geometry[0]
    ok = reachable((v - values[0]).round().long(), geometry)
    best_any = int(gain.argmax())
    best = int(torch.where(ok, gain, torch.full_like(gain, -1.0)).argmax())
    scale = float((num[best] / den[best]).clamp_min(0))
    return float(f0 - gain[best]), v[best], scale, float(f0 - gain[best_any]), bool(ok[best_any])


def best_by_scan(spec, x_star):
    """Best grid point of ``f = 1/2 ||y - x*||^2`` (kappa 1) for one seed, by the scan over scales (module
    docstring): ``(f_best, codes_best, scale_best, f_lower_bound, exact)``, codes in the rotated basis."""
    import torch

    d = x_star.numel()
    geometry = grid_geometry(spec, d)
    values = geometry[0]
    x = rotation(spec, d) @ x_star
    mids = (values[1:] + values[:-1]) / 2
    cuts = (x.view(-1, 1) / mids.view(1, -1)).flatten()
    cuts = torch.unique(cuts[torch.isfinite(cuts) & (cuts > 0)])
    ts = torch.cat([(cuts[1:] + cuts[:-1]) / 2, cuts[:1] / 2, cuts[-1:] * 2])
    index = (x.view(1, -1) / ts.view(-1, 1) - values[0]).round().clamp(0, len(values) - 1)
    return _best_of(values[0] + index, torch.eye(d, dtype=torch.float64), x, geometry)


def best_by_enumeration(spec, a, x_star):
    """Best grid point over every code vector (small d), exact: ``(f_best, codes_best, scale_best)``."""
    import itertools

    import torch

    d = x_star.numel()
    geometry = grid_geometry(spec, d)
    values = geometry[0]
    if len(values) ** d > 2**24:
        raise ValueError(f"d={d}: {len(values)}^{d} code vectors is too many to enumerate; use d <= 6")
    v = values[torch.tensor(list(itertools.product(range(len(values)), repeat=d)))]
    rot = rotation(spec, d)
    return _best_of(v, rot @ a @ rot, rot @ x_star, geometry)[:3]


def best_points(run: Run, problems, x_final) -> dict:
    """Per seed, where the best grid point is computable (d <= 6, or kappa 1; else ``{}``): ``best`` (its f / f(0)),
    ``best_exact``, ``same_codes`` (``Q(x_T)`` has the best point's codes, at its own scale) and ``dist``
    (``||Q(x_T) - y_best|| / ||y_best||``)."""
    import torch

    from hf_cage import kernels

    if run.kappa != 1 and run.d > 6:
        return {}
    spec = weight_spec(run.quantizer, run.d)
    rot = rotation(spec, run.d)
    codes = kernels.quantize_rows(x_final, spec)[0].double() + spec.code_offset
    q_final = kernels.fake_quantize(x_final, spec)[0].double()
    out = {"best": [], "best_exact": [], "same_codes": [], "dist": []}
    for (a, x_star, _), code, q in zip(problems, codes, q_final):
        f0 = float(0.5 * x_star @ a @ x_star)
        if run.d <= 6:
            (f_best, best_codes, scale), exact = best_by_enumeration(spec, a, x_star), True
        else:
            f_best, best_codes, scale, _, exact = best_by_scan(spec, x_star)
        y = rot @ (best_codes * scale)
        out["best"].append(f_best / f0)
        out["best_exact"].append(exact)
        out["same_codes"].append(bool(torch.equal(code, best_codes)))
        out["dist"].append(float((q - y).norm() / y.norm()))
    return out


# -------------------------------------------------------------------------------------------------- plans


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


# ------------------------------------------------------------------------------------------------- report

NAMES = {
    ("sgd", "ste"): "STE-SGD",
    ("adam", "ste"): "STE-Adam",
    ("sgd", "decoupled"): "CAGE-SGD",
    ("sgd", "coupled"): "CAGE-SGD coupled",
    ("adam", "decoupled"): "CAGE-Adam",
    ("adam", "coupled"): "CAGE-Adam coupled",
}
SWEPT = (("sgd", "decoupled"), ("adam", "decoupled"), ("adam", "coupled"))  # SGD coupled = SGD decoupled here


def find(done: dict[str, dict], d: int = 256, silence: float = 0.5, lr: float | None = None, **match) -> dict | None:
    """The record with these fields (``lr``: the optimizer's default peak LR unless given), or None."""
    for r in done.values():
        peak = LR[r["optimizer"]] if lr is None else lr
        if (
            (r["d"], r["silence"]) == (d, silence)
            and math.isclose(r["lr"], peak)
            and all(r[k] == v for k, v in match.items())
        ):
            return r
    return None


def ste_of(done: dict[str, dict], r: dict) -> dict | None:
    """The STE run paired with ``r``: same problems (quantizer, kappa, d, seeds), optimizer, LR and steps."""
    for s in done.values():
        if s["variant"] == "ste" and all(s[k] == r[k] for k in ("quantizer", "kappa", "d", "seeds", "optimizer")):
            if s["steps"] == r["steps"] and math.isclose(s["lr"], r["lr"]):
                return s
    return None


def _geo_mean(values) -> float:
    return math.exp(statistics.mean(math.log(v) for v in values))


def paired_ratios(done: dict[str, dict], r: dict | None) -> list[float] | None:
    """CAGE / STE final ``f(Q(x_T))`` per seed (paired), or None when either run is missing."""
    ste = ste_of(done, r) if r else None
    return None if ste is None else [c / s for c, s in zip(r["final"], ste["final"])]


def _win_cell(ratios: list[float] | None) -> str:
    if ratios is None:
        return "-"
    wins = sum(x < 1 for x in ratios)
    return f"**{_geo_mean(ratios):.2f}** ({min(ratios):.2f}-{max(ratios):.2f}), {wins}/{len(ratios)}"


def _ratio_cell(ratios: list[float] | None) -> str:
    return "-" if ratios is None else f"{_geo_mean(ratios):.2f}"


def _mean_sd(values) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main_table(done: dict[str, dict], study: str = "main") -> str:
    """Final ``f(Q(x_T)) / f(0)`` of STE per quantizer, kappa and optimizer, and CAGE's paired win over it."""
    d = 4 if study == "small" else 256
    lines = [
        "| quantizer | kappa | RTN: Q(x*) | best grid point | STE-SGD | CAGE-SGD / STE | CAGE-SGD coupled / STE "
        "| STE-Adam | CAGE-Adam / STE | CAGE-Adam coupled / STE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for quantizer in QUANTIZERS:
        for kappa in KAPPAS:
            ref = find(done, d=d, study=study, quantizer=quantizer, kappa=kappa, optimizer="adam", variant="ste")
            if ref is None:
                continue
            cells = [_mean_sd(ref["rtn"]), _mean_sd(ref["best"]) if "best" in ref else "-"]
            for opt in ("sgd", "adam"):
                ste = find(done, d=d, study=study, quantizer=quantizer, kappa=kappa, optimizer=opt, variant="ste")
                cells.append(_mean_sd(ste["final"]) if ste else "-")
                for variant in ("decoupled", "coupled"):
                    cage = find(
                        done, d=d, study=study, quantizer=quantizer, kappa=kappa, optimizer=opt, variant=variant
                    )
                    cells.append(_win_cell(paired_ratios(done, cage)))
            lines.append(f"| {quantizer} | {kappa} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def excess_table(done: dict[str, dict], study: str, kappas=KAPPAS) -> str:
    """Excess over the best grid point, ``f / f_best - 1`` (mean over seeds), and how many runs end on its codes."""
    d = 4 if study == "small" else 256
    lines = ["| quantizer | kappa | RTN | " + " | ".join(NAMES.values()) + " |", "|---|---|---|" + "---|" * len(NAMES)]
    for quantizer in QUANTIZERS:
        for kappa in kappas:
            cells = []
            for opt, variant in NAMES:
                r = find(done, d=d, study=study, quantizer=quantizer, kappa=kappa, optimizer=opt, variant=variant)
                if r is None or "best" not in r:
                    cells.append("-")
                    continue
                excess = [f / b - 1 for f, b in zip(r["final"], r["best"])]
                cells.append(f"{100 * statistics.mean(excess):.0f}% ({sum(r['same_codes'])}/{len(excess)})")
            if r is not None and "best" in r:
                rtn = statistics.mean(f / b - 1 for f, b in zip(r["rtn"], r["best"]))
                lines.append(f"| {quantizer} | {kappa} | {100 * rtn:.0f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pull_table(done: dict[str, dict], study: str, quantizer: str, pulls) -> str:
    """CAGE / STE (geometric mean over seeds, paired) against the total pull, per kappa and run (silence 0.5)."""
    lines = ["| kappa | run | " + " | ".join(f"pull {p:g}" for p in pulls) + " |", "|---|---|" + "---|" * len(pulls)]
    for kappa in KAPPAS:
        for opt, variant in SWEPT:
            cells = []
            for pull in pulls:
                studies = (study,) if study == "tune" else ("main", "pull")
                found = [
                    find(done, study=s, quantizer=quantizer, kappa=kappa, optimizer=opt, variant=variant, pull=pull)
                    for s in studies
                ]
                cells.append(_ratio_cell(paired_ratios(done, next((r for r in found if r), None))))
            lines.append(f"| {kappa} | {NAMES[opt, variant]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def silence_table(done: dict[str, dict]) -> str:
    """CAGE / STE against the silence ratio, absmax, at the main pull and a tenth of it."""
    lines = [
        "| kappa | run | pull | " + " | ".join(f"silence {s:g}" for s in SILENCES) + " |",
        "|---|---|---|" + "---|" * len(SILENCES),
    ]
    for kappa in KAPPAS:
        for opt, variant in SWEPT:
            for pull in (MAIN_PULL[opt] / 10, MAIN_PULL[opt]):
                cells = []
                for silence in SILENCES:
                    found = [
                        find(
                            done,
                            study=s,
                            quantizer="absmax",
                            kappa=kappa,
                            optimizer=opt,
                            variant=variant,
                            pull=pull,
                            silence=silence,
                        )
                        for s in ("silence", "main")
                    ]
                    cells.append(_ratio_cell(paired_ratios(done, next((r for r in found if r), None))))
                lines.append(f"| {kappa} | {NAMES[opt, variant]} | {pull:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lr_table(done: dict[str, dict]) -> str:
    """CAGE / STE at the main pull with the peak LR scaled (lambda scales inversely), each against STE at that LR."""
    scales = sorted((*LR_SCALES, 1.0))
    lines = [
        "| kappa | run | " + " | ".join(f"LR x {s:.3g}: ratio (lambda)" for s in scales) + " |",
        "|---|---|" + "---|" * len(scales),
    ]
    for kappa in KAPPAS:
        for opt, variant in SWEPT:
            cells = []
            for scale in scales:
                study = "main" if scale == 1 else "lr"
                r = find(
                    done,
                    study=study,
                    quantizer="absmax",
                    kappa=kappa,
                    optimizer=opt,
                    variant=variant,
                    lr=LR[opt] * scale,
                )
                ratios = paired_ratios(done, r)
                cells.append("-" if ratios is None else f"{_ratio_cell(ratios)} ({r['lam']:.3g})")
            lines.append(f"| {kappa} | {NAMES[opt, variant]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lambda_line(done: dict[str, dict]) -> str:
    """The lambda each total pull means at the default peak LRs (silence 0.5, 2000 steps)."""
    parts = []
    for opt in ("sgd", "adam"):
        per = pull_per_lambda(2000, LR[opt], 0.5)
        parts.append(f"{opt} (peak LR {LR[opt]:g}): lambda = pull / {per:.3g}")
    return "; ".join(parts)


def plot(done: dict[str, dict], path: Path, quantizer: str = "absmax") -> None:
    """Row 1: loss curves per kappa (geometric mean over seeds, band min..max); row 2: CAGE / STE against the total
    pull (tuning seeds); row 3: against the silence ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        ("sgd", "ste"): "tab:gray",
        ("adam", "ste"): "black",
        ("sgd", "decoupled"): "tab:blue",
        ("sgd", "coupled"): "tab:cyan",
        ("adam", "decoupled"): "tab:red",
        ("adam", "coupled"): "tab:orange",
    }
    fig, axes = plt.subplots(3, len(KAPPAS), figsize=(5.2 * len(KAPPAS), 12.5))
    for col, kappa in enumerate(KAPPAS):
        ax = axes[0, col]
        for (opt, variant), color in colors.items():
            r = find(done, study="main", quantizer=quantizer, kappa=kappa, optimizer=opt, variant=variant)
            if r is None:
                continue
            steps, curve = r["curve_steps"], r["curve"]
            style = "--" if variant == "ste" else "-"
            ax.plot(steps, [_geo_mean(c) for c in curve], style, color=color, label=NAMES[opt, variant], lw=1.3)
            ax.fill_between(steps, [min(c) for c in curve], [max(c) for c in curve], color=color, alpha=0.1)
        if r is not None:
            ax.axhline(_geo_mean(r["rtn"]), color="green", ls=":", label="round-to-nearest Q(x*)")
            if "best" in r:
                ax.axhline(_geo_mean(r["best"]), color="purple", ls=":", label="best grid point")
        ax.set_yscale("log")
        ax.set_ylim(3e-3, 3)
        ax.axvline(1000, color="0.7", lw=0.8)
        ax.set_title(f"kappa {kappa}: f(Q(x_t)) / f(0), {quantizer} 4-bit, d 256")
        ax.set_xlabel("step (silence 0.5: CAGE starts at 1000)")
        ax = axes[1, col]
        for opt, variant in CAGE_RUNS:
            points = []
            for pull in PULLS:
                r = find(
                    done, study="tune", quantizer=quantizer, kappa=kappa, optimizer=opt, variant=variant, pull=pull
                )
                ratios = paired_ratios(done, r)
                if ratios:
                    points.append((pull, _geo_mean(ratios)))
            if points:
                ax.plot(*zip(*points), "o-", color=colors[opt, variant], label=NAMES[opt, variant], ms=4)
        ax.axhline(1, color="black", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("total pull sum_t lr_t * lambda_t (silence 0.5)")
        ax.set_title(f"kappa {kappa}: CAGE / STE (geo. mean, 10 tuning seeds)")
        ax = axes[2, col]
        for opt, variant in SWEPT:
            for pull, style in ((MAIN_PULL[opt] / 10, "--"), (MAIN_PULL[opt], "-")):
                points = []
                for silence in SILENCES:
                    found = [
                        find(
                            done,
                            study=s,
                            quantizer=quantizer,
                            kappa=kappa,
                            optimizer=opt,
                            variant=variant,
                            pull=pull,
                            silence=silence,
                        )
                        for s in ("silence", "main")
                    ]
                    ratios = paired_ratios(done, next((r for r in found if r), None))
                    if ratios:
                        points.append((silence, _geo_mean(ratios)))
                if points:
                    label = f"{NAMES[opt, variant]}, pull {pull:g}"
                    ax.plot(*zip(*points), "o" + style, color=colors[opt, variant], label=label, ms=4)
        ax.axhline(1, color="black", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("silence ratio")
        ax.set_title(f"kappa {kappa}: CAGE / STE against the silence ratio")
    for row in range(3):
        axes[row, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def command_report(args) -> int:
    done = load_results(Path(args.results))
    print("### d 256: f(Q(x_T)) / f(0), mean ± sd over 10 seeds; CAGE / STE paired by seed: geo. mean (range), wins\n")
    print(main_table(done))
    print("\n### d 256, kappa 1: excess over the best grid point (runs ending on its codes)\n")
    print(excess_table(done, "main", kappas=(1,)))
    exact = [e for r in done.values() if r["study"] == "main" for e in r.get("best_exact", [])]
    print(f"\nbest grid point certified exact by the scan in {sum(exact)}/{len(exact)} seed-runs")
    print("\n### d 4: f(Q(x_T)) / f(0); CAGE / STE\n")
    print(main_table(done, study="small"))
    print("\n### d 4: excess over the best grid point (runs ending on its codes)\n")
    print(excess_table(done, "small"))
    print("\n### total pull, absmax (tuning seeds 100-109): CAGE / STE, geometric mean\n")
    print(pull_table(done, "tune", "absmax", PULLS))
    for quantizer in ("int", "quest"):
        print(f"\n### total pull, {quantizer} (seeds 0-9): CAGE / STE\n")
        print(pull_table(done, "pull", quantizer, SHORT_PULLS))
    print("\n### silence ratio, absmax (seeds 0-9): CAGE / STE\n")
    print(silence_table(done))
    print("\n### peak LR at the main pull, absmax (seeds 0-9): CAGE / STE at the same LR (lambda)\n")
    print(lr_table(done))
    print("\n" + lambda_line(done))
    seconds = sum(r["seconds"] for r in done.values())
    print(f"\n{len(done)} runs, {seconds / 60:.1f} CPU minutes of training (one thread) in total")
    if args.plot:
        plot(done, Path(args.plot))
        print(f"plot -> {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every study (or one) that is not finished")
    run.add_argument("--study", choices=["all", *PLANS], default="all")
    run.add_argument("--results", default=str(RESULTS))
    report = sub.add_parser("report", help="print the tables (markdown); --plot writes the figure")
    report.add_argument("--results", default=str(RESULTS))
    report.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    return command_run(args) if args.command == "run" else command_report(args)


if __name__ == "__main__":
    sys.exit(main())

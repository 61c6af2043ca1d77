"""The report's tables: final ``f(Q(x_T)) / f(0)`` and CAGE / STE ratios paired by seed."""

from __future__ import annotations

import math
import statistics

from .problems import KAPPAS, LR, LR_SCALES, MAIN_PULL, QUANTIZERS, SILENCES
from .training import pull_per_lambda

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


def geo_mean(values) -> float:
    return math.exp(statistics.mean(math.log(v) for v in values))


def paired_ratios(done: dict[str, dict], r: dict | None) -> list[float] | None:
    """CAGE / STE final ``f(Q(x_T))`` per seed (paired), or None when either run is missing."""
    ste = ste_of(done, r) if r else None
    return None if ste is None else [c / s for c, s in zip(r["final"], ste["final"])]


def silence_ratios(
    done: dict[str, dict], quantizer: str, kappa: float, optimizer: str, variant: str, pull: float, silence: float
) -> list[float] | None:
    """:func:`paired_ratios` of the silence sweep's point: the ``silence`` study's run at these settings, else the
    ``main`` study's (the sweep leaves out the point the main study runs: its pull at silence 0.5); None when
    neither ran."""
    settings = dict(quantizer=quantizer, kappa=kappa, optimizer=optimizer, variant=variant, pull=pull, silence=silence)
    found = [find(done, study=study, **settings) for study in ("silence", "main")]
    return paired_ratios(done, next((r for r in found if r), None))


def win_cell(ratios: list[float] | None) -> str:
    if ratios is None:
        return "-"
    wins = sum(x < 1 for x in ratios)
    return f"**{geo_mean(ratios):.2f}** ({min(ratios):.2f}-{max(ratios):.2f}), {wins}/{len(ratios)}"


def ratio_cell(ratios: list[float] | None) -> str:
    return "-" if ratios is None else f"{geo_mean(ratios):.2f}"


def mean_sd(values) -> str:
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
            cells = [mean_sd(ref["rtn"]), mean_sd(ref["best"]) if "best" in ref else "-"]
            for opt in ("sgd", "adam"):
                ste = find(done, d=d, study=study, quantizer=quantizer, kappa=kappa, optimizer=opt, variant="ste")
                cells.append(mean_sd(ste["final"]) if ste else "-")
                for variant in ("decoupled", "coupled"):
                    cage = find(
                        done, d=d, study=study, quantizer=quantizer, kappa=kappa, optimizer=opt, variant=variant
                    )
                    cells.append(win_cell(paired_ratios(done, cage)))
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
                cells.append(ratio_cell(paired_ratios(done, next((r for r in found if r), None))))
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
                    cells.append(ratio_cell(silence_ratios(done, "absmax", kappa, opt, variant, pull, silence)))
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
                cells.append("-" if ratios is None else f"{ratio_cell(ratios)} ({r['lam']:.3g})")
            lines.append(f"| {kappa} | {NAMES[opt, variant]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lambda_line(done: dict[str, dict]) -> str:
    """The lambda each total pull means at the default peak LRs (silence 0.5, 2000 steps)."""
    parts = []
    for opt in ("sgd", "adam"):
        per = pull_per_lambda(2000, LR[opt], 0.5)
        parts.append(f"{opt} (peak LR {LR[opt]:g}): lambda = pull / {per:.3g}")
    return "; ".join(parts)

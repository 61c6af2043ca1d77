"""The practical study's tables and plot: the paired share of STE's loss increase CAGE removes, per format and pull."""

from __future__ import annotations

from pathlib import Path

from .plans import (
    PRACTICAL_FORMATS,
    PRACTICAL_LONG_PULL,
    PRACTICAL_SEEDS,
    PRACTICAL_SILENCE,
    PRACTICAL_STEPS,
    format_key,
    practical_choice,
)
from .spec import spec_of
from .stats import mean, paired_removed


def removed_cell(stats: dict) -> str:
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
    """The fine-tuning table: first the ``3 * PRACTICAL_STEPS``-step runs of every format with CAGE at
    ``PRACTICAL_LONG_PULL``, then the ``PRACTICAL_STEPS``-step runs with CAGE at the sweep's choice (once made). Per
    row: the paired share of STE's loss increase CAGE removes, its standard error, the seeds CAGE won, and the
    BF16-fine-tuned / STE / CAGE mean losses over the seeds that have all three."""
    lines = [
        f"| fine-tuned into | steps | CAGE total pull (silence {PRACTICAL_SILENCE:g}) | seeds | share of STE's loss "
        "increase CAGE removes (paired mean ± s.e.) | CAGE wins / seeds | BF16 fine-tuned | STE | CAGE | STE's "
        "increase over BF16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    formats = practical_formats(rows)
    rows_at = [(fmt, 3 * PRACTICAL_STEPS, PRACTICAL_LONG_PULL, "fine-tuning default") for fmt in formats]
    choice = practical_default(rows)
    if choice is not None:
        rows_at += [(fmt, PRACTICAL_STEPS, choice, f"the {PRACTICAL_STEPS}-step sweep's choice") for fmt in formats]
    for fmt, steps, pull, why in rows_at:
        triples = practical_triples(rows, fmt, pull, PRACTICAL_SILENCE, steps)
        if not triples:
            continue
        stats = paired_removed([t[1:] for t in triples])
        b, st, c = (mean([t[i] for t in triples]) for i in (1, 2, 3))
        lines.append(
            f"| {format_label(fmt)} | {steps} | {pull:g} ({why}) | {len(triples)} | {removed_cell(stats)} | "
            f"{stats['wins']} / {stats['seeds']} | {b:.4f} | {st:.4f} | {c:.4f} | {st - b:+.4f} |"
        )
    if len(lines) == 2:
        lines.append("| (no format has finished BF16, STE and CAGE runs of one seed yet) | | | | | | | | | |")
    return "\n".join(lines)


def practical_sweep_table(rows: list[dict]) -> str:
    """The pull sweep at ``PRACTICAL_SWEEP_FORMAT``: per silence and total pull, its lambda and the paired share
    removed."""
    fmt = format_key()
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
            f"| {steps} | {silence:g} | {pull:g}{mark} | {lam:.4g} | {len(triples)} | {removed_cell(stats)} | "
            f"{stats['wins']} / {stats['seeds']} | {mean([t[3] for t in triples]):.4f} |"
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


def practical_formats(rows: list[dict]) -> list[str]:
    order = [format_key(f) for f in PRACTICAL_FORMATS]
    found = {spec_of(r).fmt for r in rows if r["method"] != "bf16"}
    return [f for f in order if f in found] + sorted(found - set(order))


def format_label(fmt: str) -> str:
    """``w4-int-g64`` -> ``W4A16 int, group 64``; ``w4-mxfp4`` -> ``W4A16 MXFP4``."""
    parts = fmt.split("-")
    bits = parts[0].upper() + ("" if "a" in parts[0] else "A16")
    grid = parts[1].upper() if parts[1].endswith("fp4") else parts[1]
    return f"{bits} {grid}" + (f", group {parts[2][1:]}" if len(parts) > 2 else "")


def plot_practical_pull(rows: list[dict], path: Path) -> bool:
    """The pull sweep at ``PRACTICAL_SWEEP_FORMAT``: the paired share of STE's increase CAGE removes against the
    total pull, mean ± s.e. and per seed, one line per silence ratio."""
    fmt = format_key()
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

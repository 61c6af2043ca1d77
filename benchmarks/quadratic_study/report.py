"""The ``report`` command: the tables (markdown) and the figure."""

from __future__ import annotations

from pathlib import Path

from .plans import load_results
from .problems import CAGE_RUNS, KAPPAS, MAIN_PULL, PULLS, SHORT_PULLS, SILENCES
from .tables import (
    NAMES,
    SWEPT,
    excess_table,
    find,
    geo_mean,
    lambda_line,
    lr_table,
    main_table,
    paired_ratios,
    pull_table,
    silence_ratios,
    silence_table,
)


def plot(done: dict[str, dict], path: Path, quantizer: str = "absmax") -> None:
    """Row 1: loss curves per kappa (geometric mean over seeds, band min..max); row 2: CAGE / STE against the total
    pull (tuning seeds); row 3: against the silence ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(NAMES, ("tab:gray", "black", "tab:blue", "tab:cyan", "tab:red", "tab:orange")))
    fig, axes = plt.subplots(3, len(KAPPAS), figsize=(5.2 * len(KAPPAS), 12.5))
    for col, kappa in enumerate(KAPPAS):
        ax = axes[0, col]
        for (opt, variant), color in colors.items():
            r = find(done, study="main", quantizer=quantizer, kappa=kappa, optimizer=opt, variant=variant)
            if r is None:
                continue
            steps, curve = r["curve_steps"], r["curve"]
            style = "--" if variant == "ste" else "-"
            ax.plot(steps, [geo_mean(c) for c in curve], style, color=color, label=NAMES[opt, variant], lw=1.3)
            ax.fill_between(steps, [min(c) for c in curve], [max(c) for c in curve], color=color, alpha=0.1)
        if r is not None:
            ax.axhline(geo_mean(r["rtn"]), color="green", ls=":", label="round-to-nearest Q(x*)")
            if "best" in r:
                ax.axhline(geo_mean(r["best"]), color="purple", ls=":", label="best grid point")
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
                    points.append((pull, geo_mean(ratios)))
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
                    ratios = silence_ratios(done, quantizer, kappa, opt, variant, pull, silence)
                    if ratios:
                        points.append((silence, geo_mean(ratios)))
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

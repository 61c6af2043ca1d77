"""The ``report`` command: the tables, the plots, and (``--write-docs``) docs/results.md."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from .orchestrate import load_results
from .practical import plot_practical_pull, practical_sweep_table, practical_table
from .served import load_served, served_table
from .spec import spec_of
from .stats import gap_closed, mean, paired_bf16
from .tables import (
    controls_table,
    finetune_table,
    formats_rows,
    is_baseline,
    map_points,
    map_table,
    pretrain_table,
)


def plot_map(done: dict[str, dict], path: Path) -> bool:
    """Left: the STE-to-BF16 gap and CAGE's paired gain over STE, in nats; right: the share of the gap closed (where
    there is a gap). Per-seed points, lines through the means."""
    points = [p for p in map_points(done) if p["variant"] == "decoupled" and p["fmt"].endswith("quest")]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted({(p["fmt"], p["setting"]) for p in points})
    settings = sorted({p["setting"] for p in points})
    for fmt, setting in series:
        color = f"C{2 * settings.index(setting) + (0 if fmt.startswith('w4') else 1)}"
        ps = sorted((p for p in points if (p["fmt"], p["setting"]) == (fmt, setting)), key=lambda p: p["tpp"])
        xs = [p["tpp"] for p in ps]
        name = f"{fmt.split('-')[0].upper()}, {setting}"
        gains = [[s - c for s, c in zip(p["ste"], p["cage"])] for p in ps]
        left.plot(xs, [mean(g) for g in gains], "-", marker="o", color=color, label=f"STE - CAGE: {name}")
        if setting == settings[0]:  # the gap does not depend on the CAGE setting: one line per format
            left.plot(
                xs,
                [mean([s - b for s, b in zip(p["ste"], p["bf16"])]) for p in ps],
                ":",
                marker="x",
                color=color,
                label=f"STE - BF16 gap: {fmt.split('-')[0].upper()}",
            )
        shares = [(p["tpp"], 100 * mean(p["shares"])) for p in ps if all(s == s for s in p["shares"])]
        if shares:
            right.plot(*zip(*shares), "-", marker="o", color=color, label=name)
        for p, g in zip(ps, gains):
            left.scatter([p["tpp"]] * len(g), g, s=8, color=color, alpha=0.5)
    # the headline (hidden 64) beside the map, as stars
    for bits, color in ((4, "C0"), (3, "C1")):
        heads = [
            (r, done.get(replace(spec_of(r), method="ste", lam=0.0, silence=0.0).key))
            for r in done.values()
            if r["study"] == "pretrain" and r["method"] == "cage" and r["w_bits"] == bits
        ]
        bf16 = {r["seed"]: r["eval_loss"] for r in done.values() if r["study"] == "pretrain" and is_baseline(r)}
        heads = [(r, ste) for r, ste in heads if ste is not None]
        for i, (r, ste) in enumerate(heads):
            label = f"hidden 64 headline, W{bits}A{bits} (per seed)" if i == 0 else "_nolegend_"
            left.scatter(
                [r["tokens_per_block_param"]],
                [ste["eval_loss"] - r["eval_loss"]],
                marker="*",
                s=60,
                color=color,
                label=f"STE - CAGE: {label}" if i == 0 else label,
            )
            share = gap_closed(ste["eval_loss"], r["eval_loss"], paired_bf16(bf16, r["seed"]))
            if share == share:
                right.scatter([r["tokens_per_block_param"]], [100 * share], marker="*", s=60, color=color, label=label)
    for ax in (left, right):
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlim(10, 200)
        ax.set_xlabel("training tokens per block parameter")
    right.axhline(15, color="gray", ls="--", lw=0.8, label="target: 15% of the gap")
    left.set_ylabel("nats (positive = CAGE better / STE worse)")
    right.set_ylabel("share of the STE-to-BF16 gap closed by CAGE (%)")
    left.set_title("Gap and CAGE's paired gain (hidden 32, QuEST)", fontsize=9)
    right.set_title("Share of the gap closed (where STE is worse than BF16)", fontsize=9)
    left.legend(fontsize=6)
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def command_report(args) -> int:
    results = Path(args.results)
    done = load_results(results)
    if not done:
        print(f"no finished runs in {results}; run `python benchmarks/accuracy.py run` first", file=sys.stderr)
        return 2

    def study(name: str) -> list[dict]:
        return [r for r in done.values() if r["study"] == name]

    has_formats = bool(study("formats"))
    sections = {
        "practical": practical_table(study("practical")) if study("practical") else "",
        "practical-sweep": practical_sweep_table(study("practical")) if study("practical") else "",
        "pretrain": pretrain_table(study("pretrain")) if study("pretrain") else "",
        "finetune": finetune_table(study("finetune")) if study("finetune") else "",
        "formats-pretrain": pretrain_table(formats_rows(done, finetuning=False)) if has_formats else "",
        "formats-finetune": finetune_table(formats_rows(done, finetuning=True)) if has_formats else "",
        "map": map_table(done) if any(r["study"] == "map" for r in done.values()) else "",
        "served": served_table(load_served(results)) if load_served(results) else "",
        "controls": controls_table(done)
        if any(not is_baseline(r) and r["method"] == "bf16" for r in done.values())
        else "",
    }
    for name, table in sections.items():
        if table:
            print(f"## {name}\n{table}\n")
    docs = Path(args.docs)
    plot = docs / "regime_map.png" if args.write_docs else Path(args.out) / "regime_map.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    if plot_map(done, plot):
        print(f"plot: {plot}")
    pull_plot = plot.with_name("practical_pull.png")
    if plot_practical_pull(study("practical"), pull_plot):
        print(f"plot: {pull_plot}")
    if args.write_docs:
        target = docs / "results.md"
        text = target.read_text() if target.exists() else ""
        for name, table in sections.items():
            if table:
                text = replace_block(text, name, table)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
        print(f"wrote {target}")
    return 0


def replace_block(text: str, name: str, body: str) -> str:
    """Put ``body`` between the ``<!-- {name}-table -->`` markers of ``text`` (appended if absent)."""
    marker = f"<!-- {name}-table -->"
    block = f"{marker}\n{body}\n{marker}"
    if text.count(marker) >= 2:
        head, _, rest = text.partition(marker)
        _, _, tail = rest.partition(marker)
        return head + block + tail
    return text.rstrip("\n") + "\n\n" + block + "\n"

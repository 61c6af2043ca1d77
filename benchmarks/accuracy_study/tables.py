"""The pretraining, fine-tuning, formats, map and control tables: eval losses paired by seed."""

from __future__ import annotations

from dataclasses import replace

from .plans import MAP_VARIANTS
from .spec import spec_of
from .stats import gap_closed, mean, paired_bf16


def fmt_losses(values: list[float]) -> str:
    return " / ".join(f"{v:.4f}" for v in values)


def bf16_row(bf16: dict[int, float], label: str) -> list[str]:
    """The BF16 baseline's row of :func:`pretrain_table` and :func:`finetune_table` (``label`` in the second column):
    seeds, mean and per-seed eval loss of ``bf16`` (seed -> loss); no row when the baseline has no run."""
    if not bf16:
        return []
    seeds = sorted(bf16)
    losses = fmt_losses([bf16[s] for s in seeds])
    return [f"| BF16 | {label} | {len(seeds)} | {mean(bf16.values()):.4f} | {losses} | | |"]


def pretrain_table(rows: list[dict]) -> str:
    """BF16 / STE / CAGE per format, per seed, with the share of the STE-to-BF16 gap closed (paired by seed)."""
    bf16 = {r["seed"]: r["eval_loss"] for r in rows if is_baseline(r)}
    lines = [
        "| run | format | seeds | eval loss (mean) | per seed | STE - CAGE (per seed) | share of STE-to-BF16 gap "
        "closed (mean, per seed) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += bf16_row(bf16, "-")
    for fmt in sorted({r["fmt_name"] for r in map(with_fmt, rows) if r["method"] != "bf16"}, reverse=True):
        ste = {r["seed"]: r for r in map(with_fmt, rows) if r["method"] == "ste" and r["fmt_name"] == fmt}
        if ste:
            seeds = sorted(ste)
            vals = [ste[s]["eval_loss"] for s in seeds]
            lines.append(f"| STE | {fmt} | {len(seeds)} | {mean(vals):.4f} | {fmt_losses(vals)} | | |")
        variants = sorted({(r["lam"], r["silence"], r["variant"]) for r in rows if r["method"] == "cage"})
        for lam, sil, variant in variants:
            cage = [
                r
                for r in map(with_fmt, rows)
                if r["method"] == "cage"
                and r["fmt_name"] == fmt
                and (r["lam"], r["silence"], r["variant"]) == (lam, sil, variant)
            ]
            cage = sorted((r for r in cage if r["seed"] in ste), key=lambda r: r["seed"])
            if not cage:
                continue
            vals = [r["eval_loss"] for r in cage]
            diffs = [ste[r["seed"]]["eval_loss"] - r["eval_loss"] for r in cage]
            shares = [
                gap_closed(ste[r["seed"]]["eval_loss"], r["eval_loss"], paired_bf16(bf16, r["seed"])) for r in cage
            ]
            label = f"CAGE lambda {lam:g}, silence {sil:g}" + (", coupled" if variant == "coupled" else "")
            lines.append(
                f"| {label} | {fmt} | {len(cage)} | {mean(vals):.4f} | {fmt_losses(vals)} | "
                f"{' / '.join(f'{d:+.4f}' for d in diffs)} | {share_cell(shares)} |"
            )
    return "\n".join(lines)


def share_cell(shares: list[float]) -> str:
    """``mean (per seed)``; a seed where STE is not worse than BF16 has no gap to close and reads ``no gap``."""
    if any(x != x for x in shares):
        return "no gap (STE not worse than BF16): " + " / ".join("no gap" if x != x else f"{x:+.0%}" for x in shares)
    return f"{mean(shares):+.1%} ({' / '.join(f'{x:+.0%}' for x in shares)})"


def with_fmt(r: dict) -> dict:
    return {**r, "fmt_name": spec_of(r).fmt}


def is_baseline(r: dict) -> bool:
    """BF16 as the recipes train it (Trainer's own optimizer groups), not the weight-decay control."""
    return r["method"] == "bf16" and r.get("bf16_decay", "trainer") == "trainer"


def controls_table(done: dict[str, dict]) -> str:
    """The BF16 weight-decay control: Trainer's groups vs block-linear decay, and the gap CAGE closes against each."""
    lines = [
        "| study | tokens / block param | format | BF16 (Trainer's decay) | BF16 (block-linear decay) | STE | "
        "CAGE lambda 13, silence 0.5 | share closed vs Trainer's BF16 | share closed vs block-decay BF16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted((r for r in done.values() if r.get("bf16_decay", "trainer") != "trainer"), key=lambda r: r["key"]):
        base = spec_of({**c, "bf16_decay": "trainer"})
        if base.key not in done:
            continue
        for bits in (4, 3):
            ste = replace(base, method="ste", w_bits=bits, a_bits=bits)
            cage = replace(ste, method="cage", lam=13.0, silence=0.5)
            if ste.key not in done or cage.key not in done:
                continue
            b0, s0, c0 = (done[x.key]["eval_loss"] for x in (base, ste, cage))
            k = c["eval_loss"]
            lines.append(
                f"| {c['study']} (hidden {c['hidden']}) | {c['tokens_per_block_param']:.0f} | {ste.fmt} | {b0:.4f} | "
                f"{k:.4f} | {s0:.4f} | {c0:.4f} | {share_cell([gap_closed(s0, c0, b0)])} | "
                f"{share_cell([gap_closed(s0, c0, k)])} |"
            )
    return "\n".join(lines)


def finetune_table(rows: list[dict]) -> str:
    """Fine-tuning: loss increase over the BF16 model fine-tuned the same way, and the share CAGE removes."""
    rows = [with_fmt(r) for r in rows]
    bf16 = {r["seed"]: r["eval_loss"] for r in rows if is_baseline(r)}
    lines = [
        "| format | method | seeds | eval loss (mean) | per seed | increase over BF16 fine-tuned (mean) | "
        "share of STE's increase removed (mean, per seed) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += bf16_row(bf16, "fine-tuned")
    for fmt in sorted({r["fmt_name"] for r in rows if r["method"] != "bf16"}, reverse=True):
        ste = {r["seed"]: r for r in rows if r["method"] == "ste" and r["fmt_name"] == fmt and r["seed"] in bf16}
        for method in ("ste", "cage"):
            variants = sorted(
                {(r["lam"], r["silence"]) for r in rows if r["method"] == method and r["fmt_name"] == fmt}
            )
            for lam, sil in variants:
                group = sorted(
                    (
                        r
                        for r in rows
                        if r["method"] == method
                        and r["fmt_name"] == fmt
                        and (r["lam"], r["silence"]) == (lam, sil)
                        and r["seed"] in bf16
                        and r["seed"] in ste
                    ),
                    key=lambda r: r["seed"],
                )
                if not group:
                    continue
                vals = [r["eval_loss"] for r in group]
                increases = [r["eval_loss"] - bf16[r["seed"]] for r in group]
                removed = ""
                label = "STE"
                if method == "cage":
                    label = f"CAGE lambda {lam:g}, silence {sil:g}"
                    shares = [
                        (ste[r["seed"]]["eval_loss"] - r["eval_loss"])
                        / (ste[r["seed"]]["eval_loss"] - bf16[r["seed"]])
                        for r in group
                    ]
                    removed = f"{mean(shares):+.1%} ({' / '.join(f'{s:+.0%}' for s in shares)})"
                lines.append(
                    f"| {fmt} | {label} | {len(group)} | {mean(vals):.4f} | {fmt_losses(vals)} | "
                    f"{mean(increases):+.4f} | {removed} |"
                )
    return "\n".join(lines)


def formats_rows(done: dict[str, dict], finetuning: bool) -> list[dict]:
    """The formats study's pretraining (or fine-tuning) runs with BF16 and QuEST W4A4 from ``pretrain`` (or
    ``finetune``): the same model, data, steps and seeds."""
    home = "finetune" if finetuning else "pretrain"
    rows = [with_fmt(r) for r in done.values()]
    return [
        r
        for r in rows
        if (r["study"] == home and (is_baseline(r) or r["fmt_name"] == "w4a4-quest"))
        or (r["study"] == "formats" and (r["init"] is not None) == finetuning)
    ]


def map_points(done: dict[str, dict]) -> list[dict]:
    """Per (steps, format, CAGE setting): the share of the gap closed per seed (paired with STE and BF16)."""
    rows = [with_fmt(r) for r in done.values() if r["study"] == "map"]
    bf16 = {(r["steps"], r["seed"]): r["eval_loss"] for r in rows if is_baseline(r)}
    ste = {(r["steps"], r["fmt_name"], r["seed"]): r["eval_loss"] for r in rows if r["method"] == "ste"}
    points: dict[tuple, dict] = {}
    for r in rows:
        if r["method"] != "cage":
            continue
        parent, base = (r["steps"], r["fmt_name"], r["seed"]), (r["steps"], r["seed"])
        if parent not in ste or base not in bf16:
            continue
        key = (r["steps"], r["fmt_name"], r["lam"], r["silence"], r["variant"])
        p = points.setdefault(
            key,
            {
                "steps": r["steps"],
                "fmt": r["fmt_name"],
                "lam": r["lam"],
                "silence": r["silence"],
                "variant": r["variant"],
                "setting": map_setting(r),
                "tpp": r["tokens_per_block_param"],
                "shares": [],
                "cage": [],
                "ste": [],
                "bf16": [],
            },
        )
        p["shares"].append(gap_closed(ste[parent], r["eval_loss"], bf16[base]))
        p["cage"].append(r["eval_loss"])
        p["ste"].append(ste[parent])
        p["bf16"].append(bf16[base])
    return sorted(points.values(), key=lambda p: (p["fmt"], p["variant"], p["lam"], p["silence"], p["steps"]))


def map_table(done: dict[str, dict]) -> str:
    lines = [
        "| tokens / block param | format | CAGE setting | seeds | BF16 | STE | CAGE | STE - CAGE (per seed) | "
        "share of gap closed (mean, per seed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in map_points(done):
        setting = f"lambda {p['lam']:g}, silence {p['silence']:g}" + (", coupled" if p["variant"] == "coupled" else "")
        lines.append(
            f"| {p['tpp']:.0f} | {p['fmt']} | {setting} | {len(p['shares'])} | {mean(p['bf16']):.4f} | "
            f"{mean(p['ste']):.4f} | {mean(p['cage']):.4f} | "
            f"{' / '.join(f'{s - c:+.4f}' for s, c in zip(p['ste'], p['cage']))} | {share_cell(p['shares'])} |"
        )
    return "\n".join(lines)


def map_setting(r: dict) -> str:
    if (r["lam"], r["silence"]) == MAP_VARIANTS[0]:
        return f"lambda {r['lam']:g} fixed, silence {r['silence']:g}"
    return f"lambda scaled to a total pull of 2, silence {r['silence']:g}"

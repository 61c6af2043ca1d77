"""Paired statistics of BF16 / STE / CAGE losses."""

from __future__ import annotations

import math
import statistics


def mean(values):
    """The mean of ``values``; NaN when there are none."""
    return statistics.mean(values) if values else float("nan")


def gap_closed(ste: float, cage: float, bf16: float) -> float:
    """Share of the STE-to-BF16 gap that CAGE closes: 1 = CAGE reaches BF16, 0 = no better than STE."""
    gap = ste - bf16
    return (ste - cage) / gap if gap > 0 else float("nan")


def paired_bf16(bf16: dict[int, float], seed: int) -> float:
    """The BF16 loss a run of ``seed`` is measured against: the BF16 run of the same seed (same initialization
    and data order) where it was trained, else the BF16 mean."""
    return bf16.get(seed, mean(bf16.values()))


def paired_removed(triples: list[tuple[float, float, float]]) -> dict:
    """Per seed ``(bf16, ste, cage)`` losses -> the share of STE's loss increase over BF16 that CAGE removes:
    mean over the seeds where STE is worse than BF16, its standard error (n >= 2), and CAGE's wins over STE."""
    shares = [(s - c) / (s - b) for b, s, c in triples if s > b]
    se = statistics.stdev(shares) / math.sqrt(len(shares)) if len(shares) >= 2 else float("nan")
    wins = sum(c < s for _, s, c in triples)
    return {"mean": mean(shares), "se": se, "n": len(shares), "wins": wins, "seeds": len(triples)}

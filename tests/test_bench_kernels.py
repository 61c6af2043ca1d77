"""The kernel benchmark's --dry-run (CPU, correctness only) keeps working; the interpreted run is in
tests/test_kernels_triton.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_checks_every_kernel_row(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_CAGE_BACKEND", "torch")
    bench = load_benchmark()
    out = tmp_path / "table.md"
    assert bench.main(["--dry-run", "--output", str(out)]) == 0
    table = out.read_text()
    assert "hf-cage backend: torch" in table
    checked = [line for line in table.splitlines() if line.endswith("| yes |")]
    assert len(checked) == 3 * len(bench.DRY_RUN_KN) * len(bench.DRY_RUN_M)
    assert "| NO |" not in table and table in capsys.readouterr().out + "\n"

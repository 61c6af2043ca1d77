"""The kernel benchmark's --dry-run (CPU, correctness only) keeps working and checks the kernels against oracles of
its own, not against hf-cage's twins; the interpreted run is in tests/test_kernels_triton.py."""

from __future__ import annotations

import json

import pytest


def test_dry_run_checks_every_kernel_row(monkeypatch, tmp_path, capsys, import_benchmark):
    monkeypatch.setenv("HF_CAGE_BACKEND", "torch")
    bench = import_benchmark("kernels")
    out, rows = tmp_path / "table.md", tmp_path / "rows.json"
    assert bench.main(["--dry-run", "--output", str(out), "--json", str(rows)]) == 0
    table = out.read_text()
    assert "hf-cage backend: torch" in table
    checked = [line for line in table.splitlines() if line.endswith("| yes |")]
    assert len(checked) == 3 * len(bench.DRY_RUN_KN) * len(bench.DRY_RUN_M)
    assert "| NO |" not in table and table in capsys.readouterr().out + "\n"
    data = json.loads(rows.read_text())
    assert data["backend"] == "torch" and len(data["rows"]) == 4 * len(bench.DRY_RUN_KN) * len(bench.DRY_RUN_M)


@pytest.mark.parametrize(
    "target, kernel",
    [
        ("w4a4_matmul_reference", "w4a4_matmul"),
        ("w4a16_matmul_reference", "w4a16_matmul"),
        ("quantize_rows", "quantize_rows act"),
    ],
)
def test_a_wrong_twin_fails_the_check(monkeypatch, capsys, target, kernel, import_benchmark):
    """The dry run's kernels are the torch twins; break one and its rows must say NO (the oracle is independent)."""
    from hf_cage.kernels import reference

    monkeypatch.setenv("HF_CAGE_BACKEND", "torch")
    original = getattr(reference, target)

    def broken(*args, **kwargs):
        out = original(*args, **kwargs)
        if isinstance(out, tuple):  # quantize_rows: scales off by 5%
            return out[0], out[1] * 1.05
        return out * 1.02

    monkeypatch.setattr(reference, target, broken)
    assert import_benchmark("kernels").main(["--dry-run"]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.endswith("| NO |")]
    assert failed and all(kernel in line for line in failed)

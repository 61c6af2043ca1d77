"""`make gpu-check` stays wired: its dry run (CPU, tiny shapes) runs every stage and writes the docs section."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_every_stage_and_writes_only_its_section(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_CAGE_BACKEND", "torch")
    gpu_check = load_gpu_check()
    docs = tmp_path / "kernels.md"
    original = (ROOT / "docs" / "kernels.md").read_text()
    docs.write_text(original)
    assert gpu_check.main(["--dry-run", "--docs", str(docs)]) == 0
    text = docs.read_text()
    head, rest = original.split(gpu_check.BEGIN)
    assert text.startswith(head) and text.endswith(rest.split(gpu_check.END)[1])
    section = text.split(gpu_check.BEGIN)[1].split(gpu_check.END)[0]
    assert "NOT A MEASUREMENT" in section and "`pytest -m gpu`:" in section
    assert "| 33 | 128 | 256 |" in section and "| CAGE (QuEST W4A4, active) |" in section
    assert "FAILED" not in section


def test_without_cuda_the_real_run_refuses(capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert load_gpu_check().main([]) == 2
    assert "--dry-run" in capsys.readouterr().err

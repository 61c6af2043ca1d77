"""The accuracy benchmark's pipeline, in seconds: runs, paired CAGE branches, report."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", REPO / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_quick_run_and_report(accuracy, tmp_path, capsys):
    assert accuracy.main(["run", "--out", str(tmp_path), "--quick", "--workers", "1"]) == 0
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert {r["key"] for r in runs} == {"fp-s0", "ste-w4a4-s0", "cage-w4a4-s0-l10-q0.5"}
    cage = next(r for r in runs if r["method"] == "cage")
    assert cage["steps_trained"] == accuracy.QUICK.steps // 2  # branched at the end of silence
    assert accuracy.main(["report", "--out", str(tmp_path)]) == 0
    assert "CAGE lambda 10, silence 0.5" in capsys.readouterr().out
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_a_lambda_zero_branch_reproduces_the_ste_run_exactly(accuracy, tmp_path):
    setup = accuracy.QUICK
    data = accuracy.prepare_data(tmp_path, setup)
    ste = accuracy.train(accuracy.Run("ste", 4, 0), setup, tmp_path, data)
    branch = accuracy.train(accuracy.Run("cage", 4, 0, 0.0, 0.5), setup, tmp_path, data)
    assert branch["eval_loss"] == ste["eval_loss"]


def test_lr_schedule_warms_up_and_decays_to_the_floor(accuracy):
    setup = accuracy.Setup(steps=100, lr=1.0)
    assert accuracy.lr_at(1, setup) == pytest.approx(0.1)
    assert accuracy.lr_at(10, setup) == pytest.approx(1.0)
    assert accuracy.lr_at(100, setup) == pytest.approx(0.1)

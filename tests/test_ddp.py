"""Two-process DDP (gloo, CPU) and one process with the same global batch train the same model.

The 2-process run is launched the way the recipes document it: ``accelerate launch --multi_gpu
--num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no`` (``--cpu
--num_processes 2`` would silently start one process). Per-device batch 4 on 2 ranks vs 8 on one rank:
each step sees the same 8 blocks (accelerate's seedable sampler, sharded batch by batch), DDP averages
the two ranks' gradients, which equals the single-process gradient up to float32 summation order.

Tolerance: losses agree to ``LOSS_ATOL`` absolute at every logged step. Rounding-order differences of
about 1e-7 can move a value across a quantizer rounding boundary and grow a little over training, so
the bound (1e-4; observed about 1e-6) is loose compared with fp32 noise but far below the change of the
loss from step to step (about 0.05 here); CAGE's lambda schedule must agree exactly, step for step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_recipes import RECIPES, SMALL, write_text

LOSS_ATOL = 1e-4  # observed: about 1e-6 over 8 steps
STEPS = 8


def _argv(tmp_path: Path, out: str, per_device_batch: int) -> list[str]:
    return [
        str(RECIPES / "pretrain_llama.py"), "--config", "tiny", "--method", "cage", "--max_steps", str(STEPS),
        "--cage_lambda", "50", "--cage_silence_ratio", "0.5", "--output_dir", str(tmp_path / out),
        "--train_file", str(tmp_path / "A.txt"), "--validation_file", str(tmp_path / "B.txt"),
        "--cache_dir", str(tmp_path / "cache"), "--save_model", "false", "--plot", "false", *SMALL,
        "--per_device_train_batch_size", str(per_device_batch), "--warmup_steps", "0",
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _history(out: Path) -> list[dict]:
    return json.loads((out / "log_history.json").read_text())


def _series(history: list[dict], key: str) -> dict[int, float]:
    return {e["step"]: e[key] for e in history if key in e}


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    write_text(tmp_path / "A.txt", 0, 800)
    write_text(tmp_path / "B.txt", 1, 200)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port())]
    # Train the tokenizer once, so that the two runs do not race to create the same cache entry.
    single = subprocess.run([sys.executable, *_argv(tmp_path, "single", 8)], env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([*launch, *_argv(tmp_path, "ddp", 4)], env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("single", "ddp"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["global_batch_size"] == two["global_batch_size"] == 8
    assert one["tokens"] == two["tokens"] and one["steps"] == two["steps"] == STEPS

    h1, h2 = _history(tmp_path / "single"), _history(tmp_path / "ddp")
    loss1, loss2 = _series(h1, "loss"), _series(h2, "loss")
    assert sorted(loss1) == sorted(loss2) == list(range(1, STEPS + 1))
    gaps = {step: abs(loss1[step] - loss2[step]) for step in loss1}
    assert max(gaps.values()) <= LOSS_ATOL, gaps
    assert loss1[STEPS] < loss1[1] - 10 * LOSS_ATOL  # the curve moves far more than the tolerance
    assert one["eval_loss"] == pytest.approx(two["eval_loss"], abs=LOSS_ATOL)

    lam1, lam2 = _series(h1, "cage/lambda"), _series(h2, "cage/lambda")
    assert lam1 == lam2 and len(lam1) == STEPS
    assert lam1[STEPS // 2] == 0 and lam1[STEPS] == pytest.approx(50.0)  # silent for half the run, then ramps

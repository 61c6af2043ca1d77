"""FSDP2 (``fully_shard``, 2 CPU processes over gloo) trains a QAT model with CAGE like one process does.

``tests/fsdp2_worker.py`` runs on 2 ranks (``torch.distributed.run``); what it does and why it is weight-only
quantized is in its docstring. Tolerances, for a 5-step run at lr 1e-3 with lambda ramping to 20:

- FSDP2 vs one process: largest weight difference <= ``MAX_ABS`` (1e-4; observed about 4e-6) and parameter
  distance <= ``REL`` (1e-4) of the distance trained (observed about 1e-5): reduction order only;
- the correction itself moves the one-process weights by >= 1e-2 of the distance trained (observed 3e-2
  decoupled, 1.06 coupled), so a correction that did nothing, or the wrong thing, on shards fails;
- resumed from a mid-run ``torch.distributed.checkpoint`` save: identical to the uninterrupted run, bit for bit,
  with the schedule counter restored;
- heads of 5 and 1 rows (uneven shards 3 + 2, and an empty shard): equal to one process within 1e-6;
- ``cage/*`` metrics measured on shards and all-reduced equal the one-process ones.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

MAX_ABS, REL = 1e-4, 1e-4
WORKER = Path(__file__).resolve().parent / "fsdp2_worker.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fsdp2_two_processes_match_one_process_and_resume_exactly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(WORKER), str(tmp_path)]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    for variant in ("decoupled", "coupled"):
        r = result[variant]
        assert r["lambdas"] == pytest.approx([0.0, 5.0, 10.0, 15.0, 20.0]) and r["cage_step"] == 5
        assert r["max_gap_to_one_process"] <= MAX_ABS, r
        assert r["gap_to_one_process"] <= REL, r
        assert r["moved_by_correction"] >= 1e-2 and r["moved_by_correction"] > 100 * r["gap_to_one_process"], r
        assert r["resume_gap"] == 0.0 and result[f"{variant}_resumed_cage_step"] == 2
        one, sharded = r["metrics_one_process"], r["metrics"]
        assert sharded["cage/quant_error"] == pytest.approx(one["cage/quant_error"], rel=1e-4)
        assert sharded["cage/clip_fraction"] == pytest.approx(one["cage/clip_fraction"], abs=1e-4)
    assert result["heads"]["local_rows"] == [[3, 1], [2, 0]]
    assert result["heads"]["gap_to_one_process"] <= 1e-6

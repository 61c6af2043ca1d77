"""Training in child processes: one torch thread each, offline, output to a log file (the demo's and the accuracy
benchmark's parallel runs)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# One thread per process (processes, not threads, share the cores) and no network.
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def start_worker(
    command: list[str], log: Path, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None
) -> subprocess.Popen:
    """Start ``command`` with :data:`WORKER_ENV` (then ``env``) over this process's environment, its stdout and
    stderr written to ``log`` (created with its folder, truncated). Returns the running process."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        return subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **WORKER_ENV, **(env or {})}, cwd=cwd
        )

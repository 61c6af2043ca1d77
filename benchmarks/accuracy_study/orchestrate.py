"""The ``run``, ``one`` and ``plan`` commands: each run in its own process (one torch thread, nice) with the library
as committed, results appended as JSON lines; restartable at any moment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .plans import full_plan, quick_plan
from .run import train
from .spec import REPO, STUDIES, Spec

PACKAGE = Path(__file__).resolve().parent
SNAPSHOT_ENTRY = "run_accuracy.py"  # benchmarks/accuracy.py in a snapshot


def results_path(results: Path, study: str) -> Path:
    """The results file of ``study`` (one JSON line per finished run)."""
    return results / f"{study}.jsonl"


def load_results(results: Path) -> dict[str, dict]:
    """Every finished run of every study under ``results``, by key."""
    done = {}
    for study in STUDIES:
        path = results_path(results, study)
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    done[r["key"]] = r
    return done


def append_result(results: Path, record: dict) -> None:
    """Append a run's result line to its study's file."""
    results.mkdir(parents=True, exist_ok=True)
    with open(results_path(results, record["study"]), "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def ready(spec: Spec, done: dict, out: Path) -> bool:
    """Whether ``spec`` can start: its STE parent finished and the model it fine-tunes saved."""
    if spec.parent is not None and spec.parent.key not in done:
        return False
    return spec.init is None or (out / "models" / spec.init / "config.json").is_file()


def code_snapshot(out: Path, commit: str = "HEAD") -> tuple[Path, str]:
    """``hf_cage`` at ``commit`` plus this benchmark as it is in the working tree (this package and its entry point),
    under OUT/code/<sha>; returns that folder and the short sha.

    Runs train with committed library code (the shared working tree may be mid-edit), and every result records the
    commit. Raises ``SystemExit`` when the snapshot does not import.
    """
    sha = subprocess.run(["git", "rev-parse", commit], cwd=REPO, capture_output=True, text=True, check=True)
    sha = sha.stdout.strip()
    target = out / "code" / sha[:12]
    if not (target / "hf_cage" / "__init__.py").is_file():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "hf_cage"], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    shutil.rmtree(target / PACKAGE.name, ignore_errors=True)
    shutil.copytree(PACKAGE, target / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(PACKAGE.parent / "accuracy.py", target / SNAPSHOT_ENTRY)
    check = f"import {PACKAGE.name}, hf_cage.export, hf_cage.optim.pull, hf_cage.trainer.comparison"
    check += "; from hf_cage import CAGEConfig, CAGETrainer"
    env = {**os.environ, "PYTHONPATH": str(target)}
    if subprocess.run([sys.executable, "-c", check], env=env, cwd=target, capture_output=True).returncode != 0:
        raise SystemExit(f"hf_cage at {sha[:12]} does not import (see {target}); pass --code-commit with a good one")
    return target, sha[:12]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` is running (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def launch(spec: Spec, out: Path, code: Path, sha: str) -> subprocess.Popen:
    """Start ``one`` for ``spec`` from the snapshot ``code`` (commit ``sha``), niced, its output in OUT/logs; a pid
    file under OUT/runs marks it running for any later driver."""
    from hf_cage.workers import start_worker

    entry = str(code / SNAPSHOT_ENTRY)
    command = ["nice", "-n", "10", sys.executable, entry, "one", "--spec", json.dumps(asdict(spec))]
    command += ["--out", str(out), "--result-file", str(out / "runs" / f"{spec.key}.json")]
    env = {"PYTHONPATH": str(code), "HF_CAGE_CODE_COMMIT": sha}
    proc = start_worker(command, out / "logs" / f"{spec.key}.log", env=env, cwd=REPO)
    (out / "runs" / f"{spec.key}.pid").write_text(str(proc.pid))
    return proc


def command_run(args) -> int:
    """Launch runs in priority order, ``--workers`` at a time. Restartable at any moment: a run still going from an
    earlier driver (its pid file) keeps its slot, and its result is collected when it appears."""
    out, results = Path(args.out), Path(args.results)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    studies = tuple(args.study.split(",")) if args.study else STUDIES
    commits = dict(part.split("=", 1) if "=" in part else ("*", part) for part in args.code_commit.split(","))
    snapshots = {study: code_snapshot(out, commits.get(study, commits.get("*", "HEAD"))) for study in studies}
    children: dict[str, subprocess.Popen] = {}
    failed: set[str] = set()

    def specs() -> list[Spec]:
        chosen = quick_plan() if args.quick else full_plan(load_results(results), studies)
        return [s for s in chosen if not args.only or any(part in s.key for part in args.only.split(","))]

    while True:
        done = load_results(results)
        running = set()
        for pid_file in (out / "runs").glob("*.pid"):
            key = pid_file.stem
            proc = children.get(key)
            alive = proc.poll() is None if proc is not None else pid_alive(int(pid_file.read_text() or 0))
            if alive:
                running.add(key)
                continue
            pid_file.unlink()
            children.pop(key, None)
            result_file = out / "runs" / f"{key}.json"
            if result_file.is_file() and key not in done:
                record = json.loads(result_file.read_text())
                append_result(results, record)
                done[key] = record
                print(f"done  {key}: eval_loss {record['eval_loss']:.4f} ({record['seconds']:.0f} s)", flush=True)
            elif key not in done:
                failed.add(key)
                print(f"FAILED {key}; log: {out / 'logs' / (key + '.log')}", flush=True)
        for spec in specs():
            if len(running) >= args.workers:
                break
            if spec.key in done or spec.key in running or spec.key in failed or not ready(spec, done, out):
                continue
            print(f"start {spec.key} (~{spec.core_minutes():.1f} core-min)", flush=True)
            children[spec.key] = launch(spec, out, *snapshots[spec.study])
            running.add(spec.key)
        if not running:
            break
        time.sleep(0.2 if args.quick else 3)
    missing = [s.key for s in specs() if s.key not in load_results(results)]
    if missing:
        print(f"{len(missing)} runs not finished (failed, or waiting on a failed parent): {', '.join(missing[:5])}")
        return 1
    return 0


def command_one(args) -> int:
    """Train ``--spec`` (a ``Spec`` as JSON) and write its result line to ``--result-file`` (atomically)."""
    spec = Spec(**json.loads(args.spec))
    record = train(spec, Path(args.out))
    target = Path(args.result_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, target)
    return 0


def command_plan(args) -> int:
    """Print the runs left per study and their cost in core-minutes."""
    done = load_results(Path(args.results))
    specs = full_plan(done)
    total = 0.0
    for study in STUDIES:
        todo = [s for s in specs if s.study == study and s.key not in done]
        cost = sum(s.core_minutes() for s in todo)
        total += cost
        print(f"{study}: {len(todo)} runs left of {sum(s.study == study for s in specs)}, ~{cost:.0f} core-minutes")
    print(f"total ~{total:.0f} core-minutes")
    return 0

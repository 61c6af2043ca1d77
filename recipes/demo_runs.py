"""The demo's runs: each recipe run in its own one-thread process (or in this one), cached by its arguments, CAGE
branched from STE's checkpoint at the end of CAGE's silence period."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RECIPES = Path(__file__).resolve().parent
METHODS = ("bf16", "ste", "cage")
RUN_RECORD = "demo_run.json"  # the arguments a run was trained with; a cached run is reused only if they match
# Bumped when the recipes' training changes results for the same arguments, so older cached runs are retrained
# (2: the BF16 baseline decays only the block linears, as CAGETrainer does).
TRAINING_REVISION = 2


def run_record(argv: list[str]) -> dict:
    return {"argv": argv, "training_revision": TRAINING_REVISION}


def cached(run_dir: Path, argv: list[str]) -> dict | None:
    record, metrics = run_dir / RUN_RECORD, run_dir / "metrics.json"
    if not (record.is_file() and metrics.is_file() and (run_dir / "config.json").is_file()):
        return None
    if json.loads(record.read_text()) != run_record(argv):
        return None
    return json.loads(metrics.read_text())


class Run:
    """One recipe process (one torch thread), its output in ``logs/<name>.log``."""

    def __init__(self, name: str, script: str, argv: list[str], run_dir: Path, logs: Path, logging_steps: int,
                 first_step: int = 1):  # fmt: skip
        self.name, self.argv, self.run_dir = name, argv, run_dir
        self.log = logs / f"{name}.log"
        self.logging_steps, self.steps_before = logging_steps, first_step - 1
        from hf_cage.workers import start_worker

        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.proc = start_worker([sys.executable, str(RECIPES / script), *argv], self.log)

    def step(self) -> int:
        """The last optimizer step done, from the training-loss lines the Trainer has logged."""
        try:
            return self.steps_before + self.log.read_text(errors="replace").count("'loss':") * self.logging_steps
        except OSError:
            return self.steps_before

    def finish(self) -> dict:
        code = self.proc.wait()
        if code != 0:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] if self.log.is_file() else []
            raise RunFailed(f"the {self.name} run failed (exit {code}): {' '.join(tail)[:300]}; log: {self.log}")
        (self.run_dir / RUN_RECORD).write_text(json.dumps(run_record(self.argv), indent=1) + "\n")
        return json.loads((self.run_dir / "metrics.json").read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class RunFailed(RuntimeError):
    pass


@dataclass
class Comparison:
    """BF16, STE and CAGE runs of one recipe; CAGE branches from STE's checkpoint at step ``branch``."""

    job: str
    script: str  # pretrain_llama.py or finetune_llama.py
    dirs: dict[str, Path]
    argvs: dict[str, list[str]]
    total: int
    branch: int
    logging_steps: int
    logs: Path

    @property
    def checkpoint(self) -> Path:
        return self.dirs["ste"] / f"checkpoint-{self.branch}"

    def run(self, method: str, first_step: int = 1) -> Run:
        name = f"{self.job}-{method}"
        return Run(name, self.script, self.argvs[method], self.dirs[method], self.logs, self.logging_steps, first_step)


def checkpoint_ready(path: Path) -> bool:
    """A Trainer checkpoint is complete once its ``trainer_state.json`` (written last) parses."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def wait(runs: dict[str, Run], until, total_steps: int, started: float, every: float = 30.0) -> None:
    """Poll until ``until()`` is true or a run failed, printing the runs' progress every ``every`` seconds."""
    last = time.monotonic()
    while not until():
        if any(r.proc.poll() not in (None, 0) for r in runs.values()):
            return
        time.sleep(0.5)
        if time.monotonic() - last >= every:
            last = time.monotonic()
            state = ", ".join(f"{m} {min(r.step(), total_steps)}/{total_steps}" for m, r in runs.items())
            print(f"demo: {time.monotonic() - started:4.0f} s: {state}", flush=True)


def train_in_parallel(done: dict, job: Comparison, started: float) -> dict:
    """BF16 and STE (those not in ``done``) in two processes; CAGE in a third once STE has written its checkpoint."""
    runs: dict[str, Run] = {}
    try:
        for method in ("bf16", "ste"):
            if method not in done:
                runs[method] = job.run(method)
        if runs:
            print(f"demo: training {' and '.join(runs)} in parallel, one process and one thread each (logs in "
                  f"{job.logs})", flush=True)  # fmt: skip
        wait(runs, lambda: checkpoint_ready(job.checkpoint), job.total, started)
        for run in runs.values():
            if run.proc.poll() not in (None, 0):
                run.finish()  # raises RunFailed with the run's last log line
        if not checkpoint_ready(job.checkpoint):
            runs["ste"].finish()
            raise RunFailed(f"the STE run ended without its branch checkpoint {job.checkpoint}")
        print(f"demo: branching CAGE from {job.checkpoint}", flush=True)
        runs["cage"] = job.run("cage", first_step=job.branch + 1)
        wait(runs, lambda: all(r.proc.poll() is not None for r in runs.values()), job.total, started)
        return {method: run.finish() for method, run in runs.items()}
    finally:
        for run in runs.values():
            run.stop()


def train_here(script: str, argv: list[str], run_dir: Path) -> dict:
    """One run in this process (``--in_process``: one after another, no parallel processes)."""
    import importlib

    shutil.rmtree(run_dir, ignore_errors=True)
    metrics = importlib.import_module(script.removesuffix(".py")).run(argv)
    (run_dir / RUN_RECORD).write_text(json.dumps(run_record(argv), indent=1) + "\n")
    return metrics


def train_base(args, argv: list[str], base_dir: Path, settings, logs: Path, started: float) -> tuple[dict, bool]:
    """The BF16 base of the fine-tuning job (one process, one thread: a second one gains little on a tiny model
    and loses much on a busy machine); returns its metrics and whether a cached run was reused."""
    hit = None if args.rerun_baselines else cached(base_dir, argv)
    if hit is not None:
        print(f"demo: reusing the cached BF16 base in {base_dir} (eval loss {hit['eval_loss']:.4f})", flush=True)
        return hit, True
    if args.in_process:
        return train_here("pretrain_llama.py", argv, base_dir), False
    print(f"demo: pretraining the BF16 base (log in {logs})", flush=True)
    run = Run("finetune-base", "pretrain_llama.py", argv, base_dir, logs, int(settings.logging_steps))
    try:
        wait({"base": run}, lambda: run.proc.poll() is not None, settings.max_steps, started)
        return run.finish(), False
    finally:
        run.stop()


def train_comparison(args, job: Comparison, done: dict, started: float) -> dict:
    """The runs of ``job`` not in ``done`` (cached), in parallel processes or (``--in_process``) here."""
    if args.in_process:
        results = dict(done)
        for method in METHODS:
            if method not in results:
                results[method] = train_here(job.script, job.argvs[method], job.dirs[method])
        return results
    return {**done, **train_in_parallel(done, job, started)}


def cached_baselines(args, job: Comparison, reusable: bool) -> dict:
    """The BF16 / STE runs of ``job`` whose recorded arguments match (STE only with its branch checkpoint)."""
    done = {}
    for method in ("bf16", "ste"):
        hit = cached(job.dirs[method], job.argvs[method]) if reusable and not args.rerun_baselines else None
        if hit is not None and (method != "ste" or checkpoint_ready(job.checkpoint)):
            done[method] = hit
            print(f"demo: reusing the cached {job.job} {method} run in {job.dirs[method]} "
                  f"(eval loss {hit['eval_loss']:.4f})")  # fmt: skip
    return done


def comparison(name: str, out: Path, common: list[str], settings) -> Comparison:
    """The BF16 / STE / CAGE runs of job ``name`` (``common``: their shared flags)."""
    from hf_cage.trainer.comparison import silence_end_step

    dirs = {m: out / name / m for m in METHODS}
    branch = silence_end_step(settings.max_steps, settings.cage_silence_ratio)
    job = Comparison(name, f"{name}_llama.py", dirs, {}, settings.max_steps, branch, int(settings.logging_steps),
                     out / "logs")  # fmt: skip
    job.argvs = {
        "bf16": [*common, "--method", "bf16", "--output_dir", str(dirs["bf16"])],
        "ste": [*common, "--method", "ste", "--save_branch_checkpoint", "--output_dir", str(dirs["ste"])],
        "cage": [*common, "--method", "cage", "--output_dir", str(dirs["cage"]), "--resume_from_checkpoint",
                 str(job.checkpoint)],
    }  # fmt: skip
    return job

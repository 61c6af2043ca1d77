"""The main job (README command 1): CAGE against STE, paired, on real text, on CPU, then exported.

    make demo                                   # sets up .venv, then runs this script
    python recipes/demo.py                      # the same, in an existing environment (about 9 minutes on 2 cores)
    python recipes/demo.py --smoke              # seconds: the whole pipeline on a toy model (checks, not results)
    python recipes/demo.py --smoke --in_process # the same without the parallel processes
    python recipes/demo.py --rerun_baselines    # retrain BF16 and STE even if cached runs match

Three runs of ``recipes/pretrain_llama.py --config tiny`` (hidden 64, 2 layers, 1500 steps x 16 x 256 tokens of
the Shakespeare plays: about 58 tokens per block parameter, the regime where CAGE's effect was measured,
docs/results.md), each in its own process with one thread:

1. BF16: the unquantized baseline (computed in fp32 on the CPU), in parallel with
2. STE: W4A4 QAT without the correction (QuEST quantizer), which saves a checkpoint at the end of CAGE's
   silence period (``--save_branch_checkpoint``);
3. CAGE: branched from that checkpoint (``--resume_from_checkpoint``), so that STE and CAGE share every step
   before it and differ only by the correction: a paired comparison, and the branch trains only the last
   ``1 - cage_silence_ratio`` of the steps.

Then the CAGE model is exported (``hf_cage.export_checkpoint``, format chosen by ``auto``: compressed-tensors
when stock loaders serve it as trained, which ``--quantizer int`` gives, else hf-cage's own, which QuEST
needs), the export is evaluated as served (compressed-tensors: stock transformers in a process without
hf_cage; hf-cage: ``hf_cage.load_quantized``), and the script prints the three losses, the paired difference,
the share of the STE-to-BF16 gap that CAGE closed, the served loss, and where everything is. One seed: the
difference it prints is one sample (docs/results.md has several seeds). Baselines whose recorded arguments
match are reused when run again. Outputs under --output_dir: bf16/, ste/ (with checkpoint-N/), cage/ (model,
metrics.json, loss_curve.png), export/ (packed weights, config, tokenizer, README.md model card), logs/.
Exit codes: 0 done; 2 bad input (one line on stderr, nothing trained); 1 a run or the export failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parent
METHODS = ("bf16", "ste", "cage")
RUN_RECORD = "demo_run.json"  # the arguments a run was trained with; a cached run is reused only if they match
# Bumped when the recipes' training changes results for the same arguments, so older cached runs are retrained
# (2: the BF16 baseline decays only the block linears, as CAGETrainer does).
TRAINING_REVISION = 2
# --smoke: a toy model and a few steps, so the whole pipeline (processes, branch, export, report) runs in seconds.
SMOKE_ARGS = [
    "--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "1", "--num_attention_heads", "2",
    "--vocab_size", "300", "--block_size", "32", "--per_device_train_batch_size", "4", "--max_eval_samples", "8",
    "--per_device_eval_batch_size", "8", "--max_steps", "10", "--logging_steps", "1",
]  # fmt: skip


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo", help="where the runs, logs and the export go")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (model init and data order)")
    parser.add_argument("--quantizer", default=None, help="quest or int (default: the tiny preset's, quest)")
    parser.add_argument("--train_file", default=None, help="plain-text training file (default: Shakespeare)")
    parser.add_argument("--validation_file", default=None, help="plain-text validation file (with --train_file)")
    parser.add_argument("--rerun_baselines", action="store_true", help="retrain BF16 and STE even if cached")
    parser.add_argument("--smoke", action="store_true", help="a toy model for a few steps: checks the pipeline")
    parser.add_argument(
        "--in_process", action="store_true", help="train the runs one after another in this process (tests, debugging)"
    )
    return parser.parse_args(argv)


def common_argv(args) -> list[str]:
    """The flags every run shares (the method, output folder and branching flags are added per run)."""
    argv = ["--config", "tiny", "--seed", str(args.seed), "--cache_dir", str(Path(args.output_dir) / "cache")]
    argv += ["--disable_tqdm", "true"]
    if args.quantizer:
        argv += ["--quantizer", args.quantizer]
    if args.train_file or args.validation_file:
        argv += ["--train_file", str(args.train_file), "--validation_file", str(args.validation_file)]
    return argv + (SMOKE_ARGS if args.smoke else [])


def prepare(argv: list[str]):
    """Check the arguments and the text, and build the tokenizer and token blocks once, before any run starts
    (the runs then find them cached instead of racing to write them). Returns the parsed ``CAGEConfig`` and
    the validation token ids ``(blocks, block_size)`` the runs evaluate on."""
    sys.path.insert(0, str(RECIPES))
    import pretrain_llama
    from recipe_common import check_training_length, load_tokenizer, parse_arguments, text_files, token_blocks

    _, data_args, _, training_args = parse_arguments(pretrain_llama.argument_types(), argv + ["--method", "ste"])
    check_training_length(training_args)
    import datasets

    datasets.disable_progress_bars()
    files = text_files(data_args)
    _, eval_blocks = token_blocks(files, load_tokenizer(data_args, files[0]), data_args)
    return training_args, eval_blocks[:]["input_ids"]


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
    """One ``pretrain_llama.py`` process (one torch thread), its output in ``logs/<method>.log``."""

    def __init__(self, method: str, argv: list[str], out: Path, logging_steps: int, first_step: int = 1):
        self.method, self.argv, self.run_dir = method, argv, out / method
        self.log = out / "logs" / f"{method}.log"
        self.logging_steps, self.steps_before = logging_steps, first_step - 1
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        with open(self.log, "w") as handle:
            command = [sys.executable, str(RECIPES / "pretrain_llama.py"), *argv]
            self.proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)

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
            raise RunFailed(f"the {self.method} run failed (exit {code}): {' '.join(tail)[:300]}; log: {self.log}")
        (self.run_dir / RUN_RECORD).write_text(json.dumps(run_record(self.argv), indent=1) + "\n")
        return json.loads((self.run_dir / "metrics.json").read_text())


class RunFailed(RuntimeError):
    pass


def checkpoint_ready(path: Path) -> bool:
    """A Trainer checkpoint is complete once its ``trainer_state.json`` (written last) parses."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def wait(runs: list[Run], until, total_steps: int, started: float, every: float = 30.0) -> None:
    """Poll until ``until()`` is true, printing the runs' progress every ``every`` seconds."""
    last = time.monotonic()
    while not until():
        if any(r.proc.poll() not in (None, 0) for r in runs):
            return
        time.sleep(0.5)
        if time.monotonic() - last >= every:
            last = time.monotonic()
            state = ", ".join(f"{r.method} {min(r.step(), total_steps)}/{total_steps}" for r in runs)
            print(f"demo: {time.monotonic() - started:4.0f} s: {state}", flush=True)


def train_in_parallel(done: dict, argvs: dict, out: Path, checkpoint: Path, training_args, started: float) -> dict:
    """BF16 and STE (those not in ``done``) in two processes; CAGE in a third once STE has written ``checkpoint``."""
    total, logging_steps = training_args.max_steps, int(training_args.logging_steps)
    runs: dict[str, Run] = {}
    try:
        for method in ("bf16", "ste"):
            if method not in done:
                runs[method] = Run(method, argvs[method], out, logging_steps)
        if runs:
            print(
                f"demo: training {' and '.join(runs)} in parallel, one process and one thread each (logs in "
                f"{out / 'logs'})",
                flush=True,
            )
        wait(list(runs.values()), lambda: checkpoint_ready(checkpoint), total, started)
        for run in runs.values():
            if run.proc.poll() not in (None, 0):
                run.finish()  # raises RunFailed with the run's last log line
        if not checkpoint_ready(checkpoint):
            runs["ste"].finish()
            raise RunFailed(f"the STE run ended without its branch checkpoint {checkpoint}")
        print(f"demo: branching CAGE from {checkpoint}", flush=True)
        branch = int(checkpoint.name.rsplit("-", 1)[1])
        runs["cage"] = Run("cage", argvs["cage"], out, logging_steps, first_step=branch + 1)
        wait(list(runs.values()), lambda: all(r.proc.poll() is not None for r in runs.values()), total, started)
        return {method: run.finish() for method, run in runs.items()}
    finally:
        for run in runs.values():
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()


def train_here(method: str, argv: list[str], out: Path) -> dict:
    """One run in this process (``--in_process``: one after another, no parallel processes)."""
    import pretrain_llama

    shutil.rmtree(out / method, ignore_errors=True)
    metrics = pretrain_llama.run(argv)
    (out / method / RUN_RECORD).write_text(json.dumps(run_record(argv), indent=1) + "\n")
    return metrics


def served_loss(export_dir: Path, fmt: str, input_ids) -> tuple[float, str]:
    """Validation loss of the export as it is served, and how it was loaded.

    compressed-tensors: stock transformers in a separate process that never imports hf_cage
    (``hf_cage.export.served``). hf-cage: stock loaders cannot read it, so ``hf_cage.load_quantized`` (packed
    ``Int4Linear`` layers), here. Both: transformers' causal-LM loss, token-weighted over the validation blocks.
    """
    if fmt == "compressed-tensors":
        from hf_cage.export.served import served_loss as stock_loss

        return stock_loss(export_dir, input_ids, batch_size=32), "stock transformers, a process without hf_cage"
    import torch

    from hf_cage import load_quantized

    model = load_quantized(export_dir, dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(input_ids), 32):
            ids = input_ids[start : start + 32]
            n = ids[:, 1:].numel()
            total += model(input_ids=ids, labels=ids).loss.double().item() * n
            count += n
    return total / count, "hf_cage.load_quantized (stock loaders cannot read it)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out = Path(args.output_dir)
    base = common_argv(args)
    sys.path.insert(0, str(RECIPES))
    from recipe_common import RecipeInputError, report_error, silence_end_step

    try:
        training_args, eval_ids = prepare(base)
    except (RecipeInputError, FileNotFoundError) as err:
        return report_error("demo.py", err)
    total = training_args.max_steps
    branch = silence_end_step(total, training_args.cage_silence_ratio)
    checkpoint = out / "ste" / f"checkpoint-{branch}"
    argvs = {
        "bf16": [*base, "--method", "bf16", "--output_dir", str(out / "bf16")],
        "ste": [*base, "--method", "ste", "--save_branch_checkpoint", "--output_dir", str(out / "ste")],
        "cage": [*base, "--method", "cage", "--output_dir", str(out / "cage"), "--resume_from_checkpoint",
                 str(checkpoint)],
    }  # fmt: skip
    results: dict[str, dict] = {}
    for method in ("bf16", "ste"):
        hit = None if args.rerun_baselines else cached(out / method, argvs[method])
        if hit is not None and (method != "ste" or checkpoint_ready(checkpoint)):
            results[method] = hit
            print(f"demo: reusing the cached {method} run in {out / method} (eval loss {hit['eval_loss']:.4f})")

    quantizer = training_args.quant_quantizer
    print(
        f"demo: {total} steps x {training_args.per_device_train_batch_size} blocks per run, W4A4 ({quantizer}), "
        f"CAGE lambda {training_args.cage_lambda:g} branched from STE at step {branch}",
        flush=True,
    )
    try:
        if args.in_process:
            for method in METHODS:
                if method not in results:
                    results[method] = train_here(method, argvs[method], out)
        else:
            results.update(train_in_parallel(results, argvs, out, checkpoint, training_args, started))
    except RunFailed as err:
        print(f"demo.py: error: {err}", file=sys.stderr)
        return 1

    # The model card shows the baselines next to CAGE.
    metrics_path = out / "cage" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["baselines"] = {m: results[m]["eval_loss"] for m in ("bf16", "ste")}
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")

    from hf_cage.export import CardOptions, ExportError, export_checkpoint

    export_dir = out / "export"
    try:
        exported = export_checkpoint(
            out / "cage",
            export_dir,
            overwrite=True,
            progress=False,
            card=CardOptions(model_name=f"tiny-llama-shakespeare-cage-w4a4-{quantizer}"),
        )
    except ExportError as err:
        print(f"demo.py: error: the export failed: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    try:
        served = served_loss(export_dir, exported.format, eval_ids)
    except (RuntimeError, ValueError, OSError) as err:
        print(f"demo.py: error: the export did not load for evaluation: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    report(results, exported, served, out, branch, time.monotonic() - started)
    return 0


def report(results: dict, exported, served: tuple[float, str], out: Path, branch: int, seconds: float) -> None:
    bf16, ste, cage = (results[m] for m in METHODS)
    fmt = f"W{ste['w_bits']}A{ste['a_bits']} ({ste['quantizer']})"
    rows = (
        ("BF16 baseline (unquantized, fp32 compute)", bf16, f"{bf16['steps']}"),
        (f"STE {fmt}", ste, f"{ste['steps']}"),
        (f"CAGE {fmt}, lambda {cage['cage_lambda']:g}", cage, f"{cage['steps'] - branch} (after {branch} shared)"),
    )
    print("\n| run | eval loss | perplexity | steps | tokens | wall time |")
    print("|---|---|---|---|---|---|")
    for label, r, steps in rows:
        print(f"| {label} | {r['eval_loss']:.4f} | {r['eval_perplexity']:.2f} | {steps} | {r['tokens']:,} "
              f"| {r['wall_time_s']:.0f} s |")  # fmt: skip
    diff = cage["eval_loss"] - ste["eval_loss"]
    gap = ste["eval_loss"] - bf16["eval_loss"]
    print(f"\nPaired difference, CAGE - STE: {diff:+.4f} nats ({'CAGE better' if diff < 0 else 'CAGE not better'}).")
    if gap > 0:
        print(f"STE-to-BF16 gap: {gap:.4f} nats; CAGE closed {-diff / gap:+.1%} of it.")
    else:
        print(f"STE-to-BF16 gap: {gap:+.4f} nats: STE is not behind BF16 here, so there is no gap to close.")
    per_param = bf16.get("tokens_per_block_parameter")
    if per_param is not None:
        print(
            f"{per_param:.3g} tokens per block parameter. One seed: one paired sample (docs/results.md has several)."
        )
    loss, how = served
    print(f"Served loss of the export: {loss:.4f} (trained CAGE model: {cage['eval_loss']:.4f}, difference "
          f"{loss - cage['eval_loss']:+.4f}); {exported.format} format, loaded with {how}.")  # fmt: skip
    logs = f"; training logs in {out}/logs" if (out / "logs").is_dir() else ""
    print(f"\nRuns:      {out}/{{bf16,ste,cage}} (model, metrics.json, loss_curve.png){logs}")
    print(f"Export:    {exported.output_dir} ({exported.format}; model card: {exported.output_dir}/README.md)")
    print(f"Wall time: {seconds:.0f} s")


if __name__ == "__main__":
    sys.exit(main())

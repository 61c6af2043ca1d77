"""The main job (README command 1): QAT fine-tuning into weight-only int4 with CAGE against STE, paired, on real
text, on CPU, exported to compressed-tensors and evaluated as stock transformers serves it.

    make demo                                   # sets up .venv, then runs this script (the fine-tuning job)
    python recipes/demo.py                      # the same, in an existing environment (under 10 minutes, 2 cores)
    python recipes/demo.py --job pretrain       # the pretraining comparison instead (make demo JOB=pretrain)
    python recipes/demo.py --smoke              # seconds: the whole pipeline on a toy model (checks, not results)
    python recipes/demo.py --smoke --in_process # the same without the parallel processes
    python recipes/demo.py --rerun_baselines    # retrain the base, BF16 and STE even if cached runs match

``--job finetune`` (the default), the job most users have: start from a pretrained model and fine-tune it into the
format that is served.

1. base: a BF16 Llama pretrained here (``recipes/pretrain_llama.py --config tiny --method bf16 --max_steps 1000``:
   hidden 64, 2 layers, 1000 steps x 16 x 256 tokens of the Shakespeare plays), the model a user would start from;
2. fine-tuned from it with ``recipes/finetune_llama.py`` (300 steps at LR 5e-4, the setting of docs/results.md
   section 2), each in its own process with one thread: BF16 (no quantization, the baseline: extra training is
   never counted as recovery) in parallel with STE into weight-only int4 (integer grid, one scale per group of 64
   inputs, or 32 where the widths need it), which saves a checkpoint at the end of CAGE's silence period; then CAGE
   branched from that checkpoint, so that STE and CAGE share every step before it (a paired comparison);
3. the CAGE model exported to compressed-tensors (``pack-quantized`` W4A16, what stock transformers and vLLM
   load) and evaluated as served: stock transformers in a process that never imports hf_cage
   (``hf_cage.export.served.evaluate_served``).

It prints the BF16-fine-tuned, STE and CAGE losses, the share of STE's loss increase (over BF16 fine-tuned) that
CAGE removed, and the served loss beside the trained one. ``--job pretrain``: BF16, STE and CAGE W4A4 (QuEST)
pretrained from scratch (the tiny preset, 1500 steps), CAGE branched from STE, the share of the STE-to-BF16 gap
CAGE closed; the export's format is chosen by ``auto`` (hf-cage for QuEST, which stock loaders cannot express).
One seed: what it prints is one paired sample (docs/results.md has several). Runs whose recorded arguments match
are reused when run again. Outputs under --output_dir: finetune/ or pretrain/ with base/ (fine-tuning only),
bf16/, ste/ (with checkpoint-N/), cage/ (model, metrics.json, loss_curve.png) and export/ (packed weights,
config, tokenizer, README.md model card); logs/.
Exit codes: 0 done; 2 bad input (one line on stderr, nothing trained); 1 a run or the export failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from demo_runs import (
    METHODS,
    Comparison,
    RunFailed,
    cached_baselines,
    comparison,
    train_base,
    train_comparison,
)

JOBS = ("finetune", "pretrain")
# CAGE's strength in the fine-tuning job: the recipes' fine-tuning default pull (sum of lr_t * lambda_t, the trainer
# derives lambda) after a silence of half the run (docs/results.md section 1: the 300-step sweep's flat top).
FINETUNE_CAGE = ["--cage_silence_ratio", "0.5"]
# The fine-tuning itself (docs/results.md section 2): 300 steps at a quarter of the pretraining LR, weight-only
# int4 (the group size is added from the model's widths), data in another order than pretraining.
FINETUNE_ARGS = ["--max_steps", "300", "--learning_rate", "5e-4", "--quantizer", "int", "--w_bits", "4",
                 "--a_bits", "0", "--quant_granularity", "group"]  # fmt: skip
# The BF16 base of the fine-tuning job: the tiny preset for 1000 steps (1000 x 16 x 256 tokens, 37 per block
# parameter; docs/results.md fine-tuned a 1500-step base), short enough that the whole job fits in 10 minutes.
BASE_ARGS = ["--max_steps", "1000"]
GROUP_SIZES = (64, 32)  # the largest that divides every quantized layer's input width is used
DATA_SEED_OFFSET = 1000  # fine-tuning data order: --data_seed 1000 + seed
# --smoke: a toy model and a few steps, so the whole pipeline (processes, branch, export, report) runs in seconds.
SMOKE_DATA = ["--block_size", "32", "--per_device_train_batch_size", "4", "--max_eval_samples", "8",
              "--per_device_eval_batch_size", "8", "--max_steps", "10", "--logging_steps", "1"]  # fmt: skip
SMOKE_MODEL = ["--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "1",
               "--num_attention_heads", "2", "--vocab_size", "300"]  # fmt: skip


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--job", choices=JOBS, default="finetune", help="finetune (default): QAT fine-tuning into weight-only int4 "
        "from a BF16 model pretrained here; pretrain: W4A4 QAT from scratch"
    )  # fmt: skip
    parser.add_argument("--output_dir", default="outputs/demo", help="where the runs, logs and the export go")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (model init and data order)")
    parser.add_argument(
        "--quantizer", default=None, help="--job pretrain: quest or int (default: quest, the preset's)"
    )
    parser.add_argument("--train_file", default=None, help="plain-text training file (default: Shakespeare)")
    parser.add_argument("--validation_file", default=None, help="plain-text validation file (with --train_file)")
    parser.add_argument("--rerun_baselines", action="store_true", help="retrain base, BF16 and STE even if cached")
    parser.add_argument("--smoke", action="store_true", help="a toy model for a few steps: checks the pipeline")
    parser.add_argument(
        "--in_process", action="store_true", help="train the runs one after another in this process (tests, debugging)"
    )
    args = parser.parse_args(argv)
    if args.quantizer and args.job == "finetune":
        parser.error("--quantizer applies to --job pretrain; the fine-tuning job trains weight-only int4")
    return args


def data_argv(args) -> list[str]:
    """The flags every run shares: preset, seed, data (the method, output folder and branching flags come later)."""
    argv = ["--config", "tiny", "--seed", str(args.seed), "--cache_dir", str(Path(args.output_dir) / "cache")]
    argv += ["--disable_tqdm", "true"]
    if args.train_file or args.validation_file:
        argv += ["--train_file", str(args.train_file), "--validation_file", str(args.validation_file)]
    return argv


def pretrain_argv(args, extra: list[str] = ()) -> list[str]:
    quantizer = ["--quantizer", args.quantizer] if args.quantizer else []
    return data_argv(args) + quantizer + list(extra) + (SMOKE_MODEL + SMOKE_DATA if args.smoke else [])


def finetune_argv(args, base_dir: Path, group_size: int) -> list[str]:
    argv = [*data_argv(args), "--model_name_or_path", str(base_dir), *FINETUNE_ARGS]
    argv += ["--quant_group_size", str(group_size), "--data_seed", str(DATA_SEED_OFFSET + args.seed), *FINETUNE_CAGE]
    return argv + (SMOKE_DATA if args.smoke else [])


def largest_group(*widths: int) -> int:
    """The largest of :data:`GROUP_SIZES` that divides every width (the inputs of the quantized linears)."""
    for size in GROUP_SIZES:
        if all(w % size == 0 for w in widths):
            return size
    raise ValueError(f"no group size of {GROUP_SIZES} divides the layer widths {widths}")


def prepare(pre_argv: list[str]):
    """Check the arguments and the text, and build the tokenizer and token blocks once, before any run starts
    (the runs then find them cached instead of racing to write them). Returns the model shape, the parsed
    ``CAGEConfig`` and the validation token ids ``(blocks, block_size)`` every run evaluates on."""
    import pretrain_llama
    from recipe_common import check_training_length, parse_arguments
    from recipe_training import load_tokenizer, text_files, token_blocks

    parsed = parse_arguments(pretrain_llama.argument_types(), pre_argv + ["--method", "ste"])
    model_args, data_args, _, training_args = parsed
    check_training_length(training_args)
    import datasets

    datasets.disable_progress_bars()
    files = text_files(data_args)
    _, eval_blocks = token_blocks(files, load_tokenizer(data_args, files[0]), data_args)
    return model_args, training_args, eval_blocks[:]["input_ids"]


def finetune_settings(argv: list[str]):
    """The fine-tuning runs' ``CAGEConfig``, parsed as ``finetune_llama.py`` parses it (flags checked up front)."""
    import finetune_llama

    return finetune_llama.parse(argv + ["--method", "ste"])[3]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, cpu_started = time.monotonic(), cpu_seconds()
    out = Path(args.output_dir)
    from recipe_common import RecipeInputError, report_error

    base_dir, logs = out / "finetune" / "base", out / "logs"
    pre = pretrain_argv(args, BASE_ARGS if args.job == "finetune" else [])  # the base's flags, or the job's
    base_argv = [*pre, "--method", "bf16", "--output_dir", str(base_dir)]
    try:
        model_args, pre_settings, eval_ids = prepare(pre)
        if args.job == "finetune":
            group = largest_group(model_args.hidden_size, model_args.intermediate_size)
            ft = finetune_argv(args, base_dir, group)
            settings = finetune_settings(ft)
        else:
            settings = pre_settings
    except (RecipeInputError, FileNotFoundError, ValueError) as err:
        return report_error("demo.py", err)

    job = comparison(args.job, out, pre if args.job == "pretrain" else ft, settings)
    quant = settings.quant_config()
    fmt = quant_label(quant)
    print(f"demo: --job {args.job}: {job.total} steps x {settings.per_device_train_batch_size} blocks per run, {fmt}, "
          f"CAGE {cage_strength(settings)} branched from STE at step {job.branch}", flush=True)  # fmt: skip
    try:
        base = None
        if args.job == "finetune":
            base, reused = train_base(args, base_argv, base_dir, pre_settings, logs, started)
            done = cached_baselines(args, job, reusable=reused)
        else:
            done = cached_baselines(args, job, reusable=True)
        results = train_comparison(args, job, done, started)
    except RunFailed as err:
        print(f"demo.py: error: {err}", file=sys.stderr)
        return 1

    # The model card shows the baselines next to CAGE.
    metrics_path = job.dirs["cage"] / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["baselines"] = {m: results[m]["eval_loss"] for m in ("bf16", "ste")}
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")

    from hf_cage.export import CardOptions, ExportError, export_checkpoint
    from hf_cage.export.served import evaluate_served

    name = f"tiny-llama-shakespeare-cage-{fmt.split()[0].lower()}-{quant.quantizer}"
    try:
        exported = export_checkpoint(
            job.dirs["cage"],
            out / args.job / "export",
            overwrite=True,
            progress=False,
            card=CardOptions(model_name=name),
        )
    except ExportError as err:
        print(f"demo.py: error: the export failed: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    try:
        served = evaluate_served(exported.output_dir, eval_ids, batch_size=32)
    except (RuntimeError, ValueError, OSError) as err:
        print(f"demo.py: error: the export did not load for evaluation: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    report(job, base, results, fmt, exported, served, out)
    print(f"Time:      {time.monotonic() - started:.0f} s wall, {cpu_seconds() - cpu_started:.0f} s CPU "
          "(this process and its runs)")  # fmt: skip
    return 0


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished child processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cage_strength(settings) -> str:
    """``pull 0.2`` (the run's total pull; the trainer derives lambda) or ``lambda 13`` (set directly)."""
    return f"pull {settings.cage_pull:g}" if settings.cage_pull is not None else f"lambda {settings.cage_lambda:g}"


def quant_label(quant) -> str:
    """``W4A16 int, group 64`` / ``W4A4 quest``."""
    acts = f"A{quant.a_bits}" if quant.a_bits else "A16"
    group = f", group {quant.group_size}" if quant.granularity == "group" else ""
    return f"W{quant.w_bits}{acts} {quant.quantizer}{group}"


def report(job: Comparison, base: dict | None, results: dict, fmt: str, exported, served, out: Path) -> None:
    bf16, ste, cage = (results[m] for m in METHODS)
    finetune = job.job == "finetune"
    rows = [("BF16 base, pretrained here (the model fine-tuned)", base, f"{base['steps']}")] if base else []
    rows += [
        ("BF16 fine-tuned (the baseline)" if finetune else "BF16 (unquantized)", bf16, f"{bf16['steps']}"),
        (f"STE {fmt}", ste, f"{ste['steps']}"),
        (f"CAGE {fmt}, lambda {cage['cage_lambda']:g}", cage, f"{cage['steps'] - job.branch} (after {job.branch} "
         "shared)"),
    ]  # fmt: skip
    print("\n| run | eval loss | perplexity | steps | tokens | wall time |")
    print("|---|---|---|---|---|---|")
    for label, r, steps in rows:
        print(f"| {label} | {r['eval_loss']:.4f} | {r['eval_perplexity']:.2f} | {steps} | {r['tokens']:,} "
              f"| {r['wall_time_s']:.0f} s |")  # fmt: skip
    diff = cage["eval_loss"] - ste["eval_loss"]
    gap = ste["eval_loss"] - bf16["eval_loss"]
    print(f"\nPaired difference, CAGE - STE: {diff:+.4f} nats ({'CAGE better' if diff < 0 else 'CAGE not better'}).")
    what = "STE's loss increase over BF16 fine-tuned" if finetune else "STE-to-BF16 gap"
    if gap > 0:
        verb = "removed" if finetune else "closed"
        print(f"{what}: {gap:.4f} nats; CAGE {verb} {-diff / gap:+.1%} of it.")
    else:
        print(f"{what}: {gap:+.4f} nats: STE is not behind BF16 here, so there is nothing to remove.")
    print("One seed: one paired sample (docs/results.md has several).")
    loss = served.loss
    print(
        f"Served loss of the export: {loss:.4f} (trained CAGE model: {cage['eval_loss']:.4f}, difference "
        f"{loss - cage['eval_loss']:+.4f}); {exported.format} format, loaded by {served.loader} in {served.dtype}, "
        f"{served.tokens:,} tokens."
    )
    if math.isfinite(loss) and abs(loss - cage["eval_loss"]) >= 5e-5:
        print("The served loss differs from the trained one (see the export's printed parity and its model card).")
    runs = ", ".join(str(job.dirs[m]) for m in METHODS)
    print(f"\nRuns:      {runs} (model, metrics.json, loss_curve.png); training logs in {out}/logs")
    print(f"Export:    {exported.output_dir} ({exported.format}; model card: {exported.output_dir}/README.md)")


if __name__ == "__main__":
    sys.exit(main())

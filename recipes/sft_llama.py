"""QAT fine-tuning of a Llama checkpoint on conversations (TRL's SFTTrainer): BF16, STE or CAGE.

The sibling of ``finetune_llama.py`` for chat data. The data is a local file (``.jsonl`` / ``.json`` /
``.parquet``) or a ``datasets`` folder (``save_to_disk``) with a ``messages`` column (conversations: lists of
``{"role", "content"}``, rendered with the tokenizer's chat template) or a ``text`` column (plain text).
The tokenizer is the checkpoint's (or ``--tokenizer_name``); one without a chat template takes
``--chat_template_path`` (a Jinja file; ``recipes/chat_template.jinja`` is a small one with the
``{% generation %}`` markers ``--assistant_only_loss`` needs). The template is saved with the model, so it
travels with ``hf-cage export``.

    python recipes/pretrain_llama.py --config tiny --method bf16 --output_dir outputs/tiny-bf16
    python recipes/sft_llama.py --config tiny --model_name_or_path outputs/tiny-bf16 --train_file chats.jsonl \\
        --chat_template_path recipes/chat_template.jinja --assistant_only_loss --method cage \\
        --max_steps 200 --learning_rate 5e-4 --output_dir outputs/sft-cage

As in ``finetune_llama.py``: compare against ``--method bf16`` (the same fine-tuning without quantization),
and branch CAGE from an STE run at the end of its silence period (``--save_branch_checkpoint`` on the STE
run, ``--resume_from_checkpoint OUT/checkpoint-N`` on the CAGE run). CAGE's strength is ``--cage_pull``
(default: hf-cage's fine-tuning pull) or ``--cage_lambda``. Every ``trl.SFTConfig`` flag works (its defaults:
bf16, gradient checkpointing, ``--max_length 1024``, no packing), with the ``quant_*`` / ``cage_*`` flags.

Without ``--validation_file``, ``--validation_fraction`` of the examples are held out (seeded). Outputs in
``--output_dir``: the model (reload with ``hf_cage.load_qat_model``), its tokenizer and chat template,
``metrics.json`` (with ``eval_loss_start``: the checkpoint, quantized, before fine-tuning),
``log_history.json``, ``loss_curve.png``. ``run(argv)`` returns the metrics; ``main(argv)`` is the command
line (exit code 0, or 2 after a one-line error on bad input, with nothing written).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from recipe_common import (
    MODEL_SHAPE_KEYS,
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
    write_outputs,
)

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Keys of the presets that describe token blocks of plain text, not conversations.
BLOCK_KEYS = frozenset({"block_size", "validation_fraction", "cache_dir", "tokenizer_name", "vocab_size"})


@dataclass
class ConversationArguments:
    """The checkpoint to start from and the conversations to fine-tune it on."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint folder to fine-tune (e.g. the output_dir of pretrain_llama.py --method bf16)."},
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a .jsonl / .json / .parquet file or a datasets folder (save_to_disk) with a "
            "'messages' (conversations) or 'text' column."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Validation data, as --train_file (default: held out of --train_file)."}
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Share of --train_file held out for validation without --validation_file."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Use this tokenizer (a local folder) instead of the checkpoint's."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many validation examples."})

    def __post_init__(self):
        if self.model_name_or_path is None:
            raise RecipeInputError("pass --model_name_or_path: the checkpoint folder to fine-tune")
        if self.train_file is None:
            raise RecipeInputError("pass --train_file: a .jsonl / .json / .parquet file or a datasets folder")
        if self.validation_file is None and not 0 < self.validation_fraction < 1:
            raise RecipeInputError(f"--validation_fraction {self.validation_fraction:g} must lie in (0, 1)")


def argument_types() -> tuple:
    """The dataclasses this script's flags fill: data, recipe, ``hf_cage.trl.CAGESFTConfig``."""
    from hf_cage.trl import CAGESFTConfig

    return ConversationArguments, RecipeArguments, CAGESFTConfig


def parse(argv: list[str] | None) -> tuple:
    """``(ConversationArguments, RecipeArguments, CAGESFTConfig)`` from the flags and the YAML preset (its model
    shape and text-block keys are not used here); the CAGE strength defaults to the fine-tuning pull."""
    return parse_arguments(
        argument_types(), argv, yaml_ignore=MODEL_SHAPE_KEYS | BLOCK_KEYS, description=__doc__, job="fine-tuning"
    )


def load_examples(path: str, flag: str):
    """The ``datasets.Dataset`` in ``path`` (a data file or a ``save_to_disk`` folder; its ``train`` split if it
    holds several), with a ``messages`` or ``text`` column, or a ``RecipeInputError`` naming the file."""
    import datasets

    source = Path(path)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # reading a small file: no bars (an error stays one line)
    try:
        if source.is_dir():
            if not any((source / name).is_file() for name in ("dataset_info.json", "dataset_dict.json")):
                raise RecipeInputError(f"{flag} {path}: not a datasets folder (written by save_to_disk)")
            data = datasets.load_from_disk(str(source))
            if isinstance(data, datasets.DatasetDict):
                if "train" not in data:
                    raise RecipeInputError(f"{flag} {path}: no 'train' split (splits: {', '.join(data)})")
                data = data["train"]
        elif source.is_file():
            kind = DATA_SUFFIXES.get(source.suffix.lower())
            if kind is None:
                raise RecipeInputError(f"{flag} {path}: not a .jsonl, .json or .parquet file")
            data = datasets.load_dataset(kind, data_files=str(source), split="train")
        else:
            raise RecipeInputError(f"{flag} {path}: no such file or folder")
    except RecipeInputError:
        raise
    except Exception as err:  # datasets reports unreadable data with many exception types
        raise RecipeInputError(f"{flag} {path}: cannot be read as a dataset ({type(err).__name__}: {err})") from err
    finally:
        if bars:
            datasets.enable_progress_bars()
    if not {"messages", "text"} & set(data.column_names):
        raise RecipeInputError(
            f"{flag} {path}: no 'messages' or 'text' column (columns: {', '.join(data.column_names)}); pass "
            "conversations as lists of {role, content} under 'messages', or plain text under 'text'"
        )
    if len(data) == 0:
        raise RecipeInputError(f"{flag} {path}: no examples")
    return data


def check_template(tokenizer, example: dict, training_args, source: str) -> None:
    """Conversations need a chat template that renders them; ``--assistant_only_loss`` needs conversations."""
    if "messages" not in example:
        if training_args.assistant_only_loss:
            raise RecipeInputError("--assistant_only_loss needs conversations (a 'messages' column), not 'text'")
        return
    template = training_args.chat_template_path
    if template is not None:
        if not (Path(template).is_file() and template.endswith((".jinja", ".j2"))):
            raise RecipeInputError(f"--chat_template_path {template}: not a .jinja file")
        tokenizer.chat_template = Path(template).read_text(encoding="utf-8")
    if not tokenizer.chat_template:
        raise RecipeInputError(
            f"the tokenizer of {source} has no chat template and the data holds conversations ('messages'); pass "
            "--chat_template_path FILE.jinja (e.g. recipes/chat_template.jinja) or a --tokenizer_name that has one"
        )
    try:
        tokenizer.apply_chat_template(example["messages"], tokenize=False)
    except Exception as err:  # a template error, or messages that are not lists of {role, content}
        raise RecipeInputError(f"the chat template cannot render the first conversation: {err}") from err


def main(argv: list[str] | None = None) -> int:
    """The command line: :func:`run`, then exit code 0, or 2 after a one-line error on bad input."""
    return run_command_line("sft_llama.py", run, argv)


def run(argv: list[str] | None = None) -> dict:
    """Parse flags, fine-tune, evaluate, write outputs; returns the run's metrics (what ``metrics.json`` holds).

    Bad input raises :class:`RecipeInputError` before anything is written to ``--output_dir``.
    """
    clock = Stopwatch()
    data_args, recipe_args, training_args = parse(argv)
    from finetune_llama import check_checkpoint, load_checkpoint

    checkpoint = check_checkpoint(data_args.model_name_or_path)
    method = recipe_args.method
    prepare_training_args(training_args, recipe_args, f"outputs/sft-{method}")

    from transformers import set_seed
    from trl import SFTTrainer

    import hf_cage

    train = load_examples(data_args.train_file, "--train_file")
    if data_args.validation_file is not None:
        evaluation = load_examples(data_args.validation_file, "--validation_file")
    else:
        if len(train) < 2:
            raise RecipeInputError(f"--train_file {data_args.train_file}: one example cannot be split for validation")
        split = train.train_test_split(test_size=data_args.validation_fraction, seed=training_args.seed)
        train, evaluation = split["train"], split["test"]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    tokenizer = load_tokenizer(data_args, None, model_dir=str(checkpoint))
    check_template(tokenizer, train[0], training_args, data_args.tokenizer_name or str(checkpoint))
    training_args.chat_template_path = None  # applied to the tokenizer above
    training_args.label_names = None  # SFTTrainer's collator builds the labels

    set_seed(training_args.seed)
    model = load_checkpoint(checkpoint)  # strict: every tensor present, nothing unexpected
    if len(tokenizer) > model.config.vocab_size:
        raise RecipeInputError(
            f"the tokenizer has {len(tokenizer)} tokens but {checkpoint} was trained with vocab_size "
            f"{model.config.vocab_size}; use the tokenizer saved with the checkpoint"
        )
    if method != "bf16":
        hf_cage.quantize_model(model, training_args.quant_config())
    trainer = make_trainer(
        method, model, training_args, train, evaluation, branch_checkpoint=recipe_args.save_branch_checkpoint,
        base=SFTTrainer, processing_class=tokenizer,
    )  # fmt: skip
    eval_loss_start = float(trainer.evaluate()["eval_loss"])
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    eval_loss = float(trainer.evaluate()["eval_loss"])

    out = Path(training_args.output_dir)
    if recipe_args.save_model:
        trainer.save_model(str(out))
    metrics = run_metrics(
        method, trainer, eval_loss, training_args.max_length, clock.seconds(), preset_name(recipe_args.config)
    )
    trained_tokens = [e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e]
    metrics.update(
        tokens=int(trained_tokens[-1]) if trained_tokens else None,
        base_model=str(checkpoint),
        dataset=str(data_args.train_file),
        eval_loss_start=eval_loss_start,
        assistant_only_loss=training_args.assistant_only_loss,
    )
    if trainer.is_world_process_zero():
        if recipe_args.save_model:
            tokenizer.save_pretrained(out)
        write_outputs(str(out), metrics, trainer.state.log_history, recipe_args.plot)
        line = f"{method}: eval_loss {eval_loss_start:.4f} -> {eval_loss:.4f} after {metrics['steps']} steps"
        print(f"{line}; outputs in {out}")
    return metrics


if __name__ == "__main__":
    exit_process(main())

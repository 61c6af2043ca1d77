"""What the recipe scripts share once their arguments are parsed: text and tokens, the Trainer, metrics and outputs,
and how a process ends.

Built on hf-cage's public API only; imported as a top-level module from the scripts' own folder, like
``recipe_common`` (the arguments).
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from recipe_common import DataArguments, RecipeInputError, checkpoint_error, report_error

# Printed when --save_branch_checkpoint's checkpoint is written.
BRANCH_MESSAGE = "branch checkpoint: {path} (branch CAGE: --method cage --resume_from_checkpoint {path})"


def end_distributed() -> None:
    """Destroy the process group of a multi-process launch (torch's documented shutdown for every trainer)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_command_line(script: str, run: Callable[[list[str] | None], dict], argv: list[str] | None) -> int:
    """A recipe's command line: ``run(argv)``, then exit code 0, or 2 after a one-line error naming ``script``
    on bad input (:class:`RecipeInputError`, a missing file); the process group is ended either way."""
    try:
        run(argv)
    except (RecipeInputError, FileNotFoundError) as err:
        return report_error(script, err)
    finally:
        end_distributed()
    return 0


def exit_process(code: int) -> NoReturn:
    """Exit with ``code``; a rank of a multi-process launch (``WORLD_SIZE`` > 1) flushes its streams and leaves
    with ``os._exit``, skipping interpreter shutdown, where the gloo group DDP / FSDP2 still hold can abort it
    (docs/recipes.md). Every output must be written before."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def check_text_file(path: str, flag: str) -> Path:
    """``path`` exists and is non-blank UTF-8 text, or a ``RecipeInputError`` naming the file and the flag.

    Reads the whole file (1 MiB at a time): a NUL byte means a binary file, and bytes that do not decode
    as UTF-8 would otherwise fail deep inside the tokenizer or ``datasets``.
    """
    p = Path(path)
    if not p.is_file():
        raise RecipeInputError(f"{flag} {path}: no such file; pass a plain-text file")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, blank = 0, True
    with p.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise RecipeInputError(
                    f"{flag} {path}: a binary file (NUL byte at offset {offset + nul}), not text; "
                    "pass a plain-text UTF-8 file"
                )
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise RecipeInputError(
                    f"{flag} {path}: not UTF-8 text (invalid byte near offset {offset + err.start}); convert it to "
                    "UTF-8 first (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            blank = blank and not chunk.strip()
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise RecipeInputError(
            f"{flag} {path}: not UTF-8 text (it ends inside a character); convert it to UTF-8"
        ) from None
    if blank:
        raise RecipeInputError(f"{flag} {path}: the file is empty (or only whitespace); pass a file with text in it")
    return p


def text_files(data_args: DataArguments) -> tuple[Path, Path]:
    """The training and validation text: the user's files, or the Shakespeare split cached under ``cache_dir``."""
    if data_args.train_file is not None:
        return (
            check_text_file(data_args.train_file, "--train_file"),
            check_text_file(data_args.validation_file, "--validation_file"),
        )
    from hf_cage.data import shakespeare_files, write_document_split

    split_dir = Path(data_args.cache_dir) / f"shakespeare-val{data_args.validation_fraction:g}"
    return write_document_split(shakespeare_files(), split_dir, data_args.validation_fraction)


def load_tokenizer(data_args: DataArguments, train_file: Path, model_dir: str | None = None):
    """The tokenizer a run uses: ``--tokenizer_name``, else the one saved in ``model_dir``, else a BPE trained here."""
    from transformers import AutoTokenizer

    from hf_cage.data import train_bpe_tokenizer

    source = data_args.tokenizer_name or model_dir
    if source is not None:
        if not (Path(source) / "tokenizer.json").is_file() and not (Path(source) / "tokenizer_config.json").is_file():
            raise RecipeInputError(f"no tokenizer in {source}; pass --tokenizer_name with a folder that holds one")
        return AutoTokenizer.from_pretrained(source)
    return train_bpe_tokenizer([train_file], vocab_size=data_args.vocab_size, cache_dir=data_args.cache_dir)


def token_blocks(files: tuple[Path, Path], tokenizer, data_args: DataArguments):
    """``(train, validation)`` datasets of ``block_size``-token ``input_ids`` / ``labels`` blocks."""
    from hf_cage.data import load_token_blocks

    datasets = []
    for path, limit in zip(files, (data_args.max_train_samples, data_args.max_eval_samples)):
        try:
            blocks = load_token_blocks([path], tokenizer, data_args.block_size)
        except ValueError as err:
            raise RecipeInputError(str(err)) from err
        if limit is not None:
            blocks = blocks.select(range(min(limit, len(blocks))))
        datasets.append(blocks)
    return datasets[0], datasets[1]


def check_resume_tensors(trainer) -> None:
    """The checkpoint a run resumes from holds exactly the tensors of the model it is loaded into (Trainer's own
    resume only warns about missing or unexpected keys): the model's, or a LoRA model's adapter tensors."""
    resume = trainer.args.resume_from_checkpoint
    if resume is None:
        return
    from hf_cage.qat import CheckpointError, check_saved_tensors

    model = trainer.model
    try:
        if hasattr(model, "peft_config"):
            from peft import get_peft_model_state_dict

            check_saved_tensors(resume, get_peft_model_state_dict(model), "adapter_model.safetensors")
        else:
            check_saved_tensors(resume, model.state_dict())
    except CheckpointError as err:
        raise checkpoint_error("--resume_from_checkpoint", resume, err) from None


def make_trainer(
    method: str,
    model,
    training_args,
    train_dataset,
    eval_dataset,
    plain: bool = False,
    branch_checkpoint=False,
    base=None,
    **trainer_kwargs,
):
    """``bf16`` -> ``base`` with CAGETrainer's weight-decay policy (``block_decay_trainer_class``);
    ``plain`` -> ``base``; ``ste`` / ``cage`` -> ``hf_cage.CAGETrainerMixin`` over ``base``.

    ``base`` is the Trainer class (default ``transformers.Trainer``, with ``default_data_collator`` over the
    token blocks; the SFT recipe passes TRL's ``SFTTrainer``); ``trainer_kwargs`` go to its constructor.
    ``plain`` is for a model quantized beforehand whose quantized weights are all frozen (LoRA): STE
    training needs no more than the model's own ``QATLinear`` forward. ``branch_checkpoint`` adds a checkpoint
    at the end of CAGE's silence period (``--save_branch_checkpoint``). A checkpoint to resume from is checked to
    hold exactly the model's tensors (:func:`check_resume_tensors`).
    """
    from transformers import Trainer, default_data_collator

    from hf_cage import CAGETrainer, CAGETrainerMixin
    from hf_cage.trainer.comparison import block_decay_trainer_class, branch_checkpoint_callback

    if base is None:
        base = Trainer
        trainer_kwargs.setdefault("data_collator", default_data_collator)
    if plain:
        cls = base
    elif method == "bf16":
        cls = block_decay_trainer_class(base)
    else:
        cls = CAGETrainer if base is Trainer else type(f"CAGE{base.__name__}", (CAGETrainerMixin, base), {})
    with no_new_empty_folder(training_args.output_dir, keep=True):  # Trainer.__init__ makes the output folder
        trainer = cls(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=[branch_checkpoint_callback(training_args.cage_silence_ratio, BRANCH_MESSAGE)]
            if branch_checkpoint
            else None,
            **trainer_kwargs,
        )
        check_resume_tensors(trainer)
    return trainer


@contextmanager
def no_new_empty_folder(folder: str, keep: bool = False):
    """Remove ``folder`` at the end of the block if the block created it and left it empty (``keep``: only when
    the block raised), so that a run refused for bad input, or an evaluation, leaves no empty output folder."""
    path = Path(folder)
    existed = path.exists()

    def remove():
        if not existed and path.is_dir() and not any(path.iterdir()):
            path.rmdir()

    try:
        yield
    except BaseException:
        remove()
        raise
    if not keep:
        remove()


def evaluate_loss(model, training_args, eval_dataset) -> float:
    """Validation loss of ``model`` as ``Trainer.evaluate`` computes it (token-mean cross entropy), no training."""
    from transformers import Trainer, default_data_collator

    with no_new_empty_folder(training_args.output_dir):  # Trainer.__init__ makes the output folder
        trainer = Trainer(
            model=model, args=training_args, eval_dataset=eval_dataset, data_collator=default_data_collator
        )
        return float(trainer.evaluate()["eval_loss"])


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def run_metrics(
    method: str, trainer, eval_loss: float, block_size: int, wall_time_s: float, preset: str | None
) -> dict:
    """The fields every ``metrics.json`` holds (the README and the accuracy benchmark read them)."""
    args = trainer.args
    quantized = method != "bf16"
    quant = args.quant_config() if quantized else None
    correction = getattr(trainer, "cage_correction", None) if quantized else None  # None with LoRA (plain Trainer)
    steps = trainer.state.global_step
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    train_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "method": method,
        "preset": preset,
        "eval_loss": eval_loss,
        "eval_perplexity": perplexity(eval_loss),
        "final_train_loss": train_losses[-1] if train_losses else None,
        "w_bits": quant.w_bits if quant else None,
        "a_bits": quant.a_bits if quant else None,
        "quantizer": quant.quantizer if quant else None,
        "cage_lambda": correction.cage_lambda if correction is not None else (args.cage_lambda if quantized else None),
        "cage_pull": args.cage_pull if quantized else None,
        "cage_pull_realised": correction.pull_realised if correction is not None else None,
        "cage_silence_ratio": float(args.cage_silence_ratio) if quantized else None,
        "steps": steps,
        "global_batch_size": global_batch,
        "block_size": block_size,
        "tokens": steps * global_batch * block_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "world_size": args.world_size,
        "resumed_from": args.resume_from_checkpoint,
        "wall_time_s": round(wall_time_s, 2),
    }


def write_outputs(output_dir: str, metrics: dict, log_history: list[dict], plot: bool) -> None:
    """``metrics.json``, ``log_history.json`` and (if ``plot``) ``loss_curve.png`` under ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / "log_history.json").write_text(json.dumps(log_history, indent=1) + "\n", encoding="utf-8")
    if plot:
        from hf_cage.plots import plot_loss_curve

        title = f"{metrics['method']} ({out.name})"
        plot_loss_curve(log_history, out / "loss_curve.png", title=title, lambda_axis=True)


class Stopwatch:
    """Wall time of a run, from the start of ``main`` to the end of evaluation."""

    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start

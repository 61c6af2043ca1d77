"""What ``pretrain_llama.py`` and ``finetune_llama.py`` share: arguments, YAML presets, data, metrics, plots.

Kept beside the scripts (not in ``hf_cage``): it is recipe plumbing built on hf-cage's public API only.
The scripts import it as a top-level module, which works because Python puts a script's own folder
first on ``sys.path`` (``python recipes/x.py`` and ``accelerate launch recipes/x.py`` alike).

Arguments come from dataclasses through ``transformers.HfArgumentParser``. ``--config FILE.yaml``
(or a preset name such as ``tiny``) supplies defaults as flat ``key: value`` pairs; flags given on the
command line override them.
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
METHODS = ("bf16", "ste", "cage")
# Preset keys that describe a model trained from scratch; fine-tuning takes the shape from its checkpoint.
MODEL_SHAPE_KEYS = frozenset(
    {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"}
    | {"head_dim", "tie_word_embeddings", "rope_theta", "vocab_size"}
)
# Short flags, spelled as CAGEConfig's prefixed fields (an alias whose field CAGEConfig lacks is not offered).
FLAG_ALIASES = {
    "--w_bits": "quant_w_bits",
    "--a_bits": "quant_a_bits",
    "--quantizer": "quant_quantizer",
    "--a_clip": "quant_a_clip",
}
# Exit code of a run refused for bad input (one line on stderr, nothing written to the output folder).
EXIT_BAD_INPUT = 2


class RecipeInputError(ValueError):
    """Bad user input (missing file, empty text, unknown preset or key): reported as one line, exit code 2."""


def end_distributed() -> None:
    """Destroy the process group of a multi-process launch (torch's documented shutdown for every trainer)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """Exit with ``code``; a rank of a multi-process launch leaves without interpreter shutdown.

    ``destroy_process_group`` does not free a gloo group that DDP (its reducer) or FSDP2 (DTensor's sharding
    cache) still holds, so the group is torn down during interpreter shutdown, where it now and then aborts the
    rank after its work is done ("terminate called without an active exception", exit -6: seen in CI for the DDP
    and FSDP2 tests, and once in ~40 local FSDP2 runs). Every output is written by then; the streams are flushed
    and the rank ends with ``os._exit``, so other libraries' ``atexit`` handlers do not run in such a launch.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def report_error(script: str, err: BaseException) -> int:
    """Print ``err`` as one line on stderr, prefixed by the script name; returns :data:`EXIT_BAD_INPUT`."""
    print(f"{script}: error: {' '.join(str(err).split())}", file=sys.stderr)
    return EXIT_BAD_INPUT


@dataclass
class RecipeArguments:
    """How a run is set up, beyond the model, the data and the ``CAGEConfig``."""

    config: str | None = field(
        default=None,
        metadata={
            "help": "YAML preset: a path, or a name under recipes/configs (tiny, 30m, 50m, 100m, 200m, 430m, 800m)."
        },
    )
    method: str = field(
        default="cage",
        metadata={"help": "bf16: no quantization (plain Trainer); ste: QAT with cage_lambda=0; cage: QAT with CAGE."},
    )
    plot: bool = field(default=True, metadata={"help": "Write loss_curve.png beside metrics.json."})
    save_model: bool = field(default=True, metadata={"help": "Save the trained model and tokenizer to output_dir."})
    save_branch_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "Also save a full Trainer checkpoint (weights, optimizer, LR schedule, RNG, data position) at the "
            "last step of CAGE's silence period, output_dir/checkpoint-N with N = the last step t with "
            "t / max_steps <= cage_silence_ratio: an STE run's checkpoint there is where a CAGE run branches "
            "from with --method cage --resume_from_checkpoint (paired with the STE run)."
        },
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise RecipeInputError(f"--method {self.method!r} is not supported; choose one of {', '.join(METHODS)}")


@dataclass
class DataArguments:
    """Text in, fixed-length token blocks out."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Plain-text training file (any datasets-loadable text file). Default: the Shakespeare plays."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Plain-text validation file; required together with --train_file."}
    )
    cache_dir: str = field(
        default="outputs/cache",
        metadata={"help": "Where the Shakespeare split and the trained tokenizers are cached (shared between runs)."},
    )
    vocab_size: int = field(
        default=2048, metadata={"help": "Size of the byte-level BPE trained on the training text."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Use this tokenizer (a local folder) instead of training a BPE."}
    )
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence (packed, no padding)."})
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Share of the Shakespeare plays held out for validation (split by play)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many validation blocks."})

    def __post_init__(self):
        if self.block_size < 2:
            raise RecipeInputError(f"--block_size {self.block_size} is too small; use at least 2 tokens")
        if (self.train_file is None) != (self.validation_file is None):
            raise RecipeInputError(
                "pass --train_file and --validation_file together (or neither, to use the Shakespeare plays)"
            )


def resolve_config_path(config: str) -> Path:
    """A preset name (``tiny``) or a YAML path -> an existing file, or a ``RecipeInputError`` listing the presets."""
    path = Path(config)
    if path.is_file():
        return path
    preset = CONFIG_DIR / f"{config}.yaml"
    if preset.is_file():
        return preset
    presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise RecipeInputError(f"unknown preset or missing config file {config!r}; presets: {presets} (or a YAML path)")


def preset_name(config: str | None) -> str | None:
    return None if config is None else Path(config).stem


def _yaml_to_argv(path: Path, known: set[str], ignore: set[str]) -> list[str]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise RecipeInputError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise RecipeInputError(f"{path} must hold flat `key: value` pairs, got {type(data).__name__}")
    unknown = sorted(k for k in data if k not in known and k not in ignore and f"--{k}" not in FLAG_ALIASES)
    if unknown:
        raise RecipeInputError(f"{path}: unknown keys {unknown}; every key must be a command-line flag of this script")
    argv = []
    for key, value in data.items():
        if key in ignore or value is None:
            continue
        if isinstance(value, dict):
            value = json.dumps(value)
        values = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(str(v) for v in values)]
    return argv


class _RecipeArgumentParser:
    """Mixed into ``HfArgumentParser``: a bad flag is a :class:`RecipeInputError` (one line), not usage + exit."""

    def error(self, message: str):
        raise RecipeInputError(f"{message}; see --help")


def _bits_or_none(value: str) -> int:
    """``--a_bits none`` (weight-only) as well as ``--a_bits 0``; CAGEConfig reads 0 as weight-only."""
    return 0 if value.strip().lower() in ("none", "null") else int(value)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the script docstring's launch commands as written."""


def strength_default(argv: list[str], job: str) -> list[str]:
    """``["--cage_pull", <the job's default pull>]`` unless ``argv`` (YAML keys included) sets ``cage_lambda`` or
    ``cage_pull``: the recipes' CAGE strength is a pull, :data:`hf_cage.optim.defaults.CAGE_PULL_DEFAULTS`."""
    from hf_cage.optim.defaults import CAGE_PULL_DEFAULTS

    flags = {arg.split("=", 1)[0] for arg in argv}
    return [] if flags & {"--cage_lambda", "--cage_pull"} else ["--cage_pull", repr(CAGE_PULL_DEFAULTS[job])]


def parse_arguments(
    dataclass_types: tuple,
    argv: list[str] | None,
    yaml_ignore: set[str] = frozenset(),
    description: str | None = None,
    job: str = "pretraining",
):
    """Parse ``argv`` (default ``sys.argv[1:]``) into instances of ``dataclass_types``, YAML first, flags last.

    ``yaml_ignore`` names YAML keys this script does not use (the model shape, for fine-tuning);
    ``description`` heads ``--help`` (the script's docstring); ``job`` (``pretraining`` or ``fine-tuning``)
    picks the default ``cage_pull`` when neither the preset nor the flags set the CAGE strength.
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser_cls = type("RecipeArgumentParser", (_RecipeArgumentParser, HfArgumentParser), {})
    parser = parser_cls(dataclass_types, description=description, formatter_class=_HelpFormatter)
    for action in parser._actions:
        if action.dest == "quant_a_bits" and action.type is int:
            action.type = _bits_or_none
    for alias, dest in FLAG_ALIASES.items():
        action = next((a for a in parser._actions if a.dest == dest), None)
        if action is not None:
            parser.add_argument(
                alias, dest=dest, type=action.type, default=argparse.SUPPRESS, help=f"Same as --{dest}."
            )
    if {"-h", "--help", "--help-all"} & set(argv):
        from recipe_help import HELP_ALL, format_help

        print(format_help(parser, dataclass_types, full=HELP_ALL in argv))
        raise SystemExit(0)
    known = {a.dest for a in parser._actions}
    config = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
    prefix = _yaml_to_argv(resolve_config_path(config), known, set(yaml_ignore)) if config else []
    if "cage_pull" in known:
        prefix = strength_default(prefix + argv, job) + prefix
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(
            args=prefix + argv, look_for_args_file=False, return_remaining_strings=True
        )
    except RecipeInputError:
        raise
    except ValueError as err:  # a dataclass refused a value (CAGEConfig / TrainingArguments __post_init__)
        raise RecipeInputError(str(err)) from err
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return tuple(parsed)


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


def prepare_training_args(training_args, recipe_args: RecipeArguments, default_dir: str):
    """Fill in what the recipes need from ``TrainingArguments`` (an output dir, ``labels``, no column pruning)
    and refuse settings under which no training can run or resume, before anything is written."""
    if training_args.output_dir is None:
        training_args.output_dir = default_dir
    training_args.label_names = ["labels"]
    training_args.remove_unused_columns = False
    if recipe_args.method == "ste":
        training_args.cage_lambda, training_args.cage_pull = 0.0, None
    check_training_length(training_args)
    check_training_values(training_args)
    check_output_dir(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if resume is not None and not (Path(resume) / "trainer_state.json").is_file():
        raise RecipeInputError(
            f"--resume_from_checkpoint {resume}: not a Trainer checkpoint (no trainer_state.json); pass a "
            "checkpoint-N folder, e.g. one written by --save_branch_checkpoint"
        )
    if resume is not None:
        check_resume_settings(resume, training_args, recipe_args.method)
    return training_args


def check_training_values(training_args) -> None:
    """Batch sizes and accumulation of at least 1, a learning rate >= 0: what no run can train with otherwise."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(training_args, name)
        if value < 1:
            raise RecipeInputError(f"--{name} {value} must be at least 1")
    if training_args.learning_rate < 0:
        raise RecipeInputError(f"--learning_rate {training_args.learning_rate:g} is negative; pass a rate >= 0")


def check_output_dir(output_dir: str) -> None:
    """``output_dir`` is a folder or can become one: no part of the path is a regular file."""
    path = Path(output_dir).absolute()
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "is" if part == path else f"lies below {part}, which is"
                raise RecipeInputError(f"--output_dir {output_dir} {where} a file, not a folder; choose another path")
            return


def checkpoint_error(flag: str, path, err: Exception) -> RecipeInputError:
    """A loading error of hf-cage (one line) as the recipes' bad-input error, naming the flag."""
    return RecipeInputError(f"{flag} {path}: {err}")


def check_resume_settings(resume: str, training_args, method: str) -> None:
    """The checkpoint resumed from was trained with this run's quantization (every ``QuantConfig`` field), or
    without quantization for ``--method bf16``; its config and weight files are readable. A run that changes
    them midway would record settings it trained only part of the steps with."""
    from hf_cage.qat import CONFIG_KEY, CheckpointError, read_model_config, saved_tensor_shapes

    flag = "--resume_from_checkpoint"
    if (Path(resume) / "adapter_model.safetensors").is_file():
        return  # LoRA adapters only: the quantized base comes from --model_name_or_path and the flags
    try:
        saved = read_model_config(resume).get(CONFIG_KEY)
        saved_tensor_shapes(resume)
    except (CheckpointError, FileNotFoundError) as err:
        raise checkpoint_error(flag, resume, err) from None
    asked = None if method == "bf16" else training_args.quant_config().to_dict()
    if (saved is None) != (asked is None):
        trained = "without quantization" if saved is None else "with quantization"
        raise RecipeInputError(
            f"{flag} {resume} was trained {trained}; --method {method} cannot resume it: pass the method it was "
            "trained with (bf16 for an unquantized checkpoint, ste or cage for a quantized one)"
        )
    if saved is not None:
        changed = [f"quant_{k}={asked[k]!r} (checkpoint: {saved.get(k)!r})" for k in asked if saved.get(k) != asked[k]]
        if changed:
            raise RecipeInputError(
                f"{flag} {resume} was trained with other quantization settings: {', '.join(changed)}; resume "
                "with the checkpoint's settings, or start a new run"
            )


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


def check_training_length(training_args) -> None:
    """``max_steps`` > 0, or -1 (``TrainingArguments``' "train num_train_epochs epochs") with epochs > 0."""
    steps, epochs = training_args.max_steps, training_args.num_train_epochs
    if steps == -1 and epochs <= 0:
        raise RecipeInputError(
            f"--num_train_epochs {epochs:g} with --max_steps -1 trains nothing; pass a positive --max_steps"
        )
    if steps == 0 or steps < -1:
        raise RecipeInputError(
            f"--max_steps {steps} trains nothing; pass a positive number of optimizer steps "
            "(or -1 to train --num_train_epochs epochs)"
        )


def silence_end_step(total_steps: int, silence_ratio: float) -> int:
    """The last optimizer step of CAGE's silence period (0 when there is none), as hf-cage's schedule decides it."""
    from hf_cage import cage_lambda

    step = min(total_steps, int(silence_ratio * total_steps))
    while step < total_steps and cage_lambda(step + 1, total_steps, 1.0, silence_ratio, "constant") == 0:
        step += 1
    while step > 0 and cage_lambda(step, total_steps, 1.0, silence_ratio, "constant") != 0:
        step -= 1
    return step


def branch_checkpoint_callback(silence_ratio: float):
    """A ``TrainerCallback`` that saves a full checkpoint at :func:`silence_end_step` of the run (if > 0)."""
    from transformers import TrainerCallback

    class SaveAtSilenceEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step = silence_end_step(state.max_steps, silence_ratio)
            if step > 0 and state.global_step == step:
                control.should_save = True
            return control

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == silence_end_step(state.max_steps, silence_ratio) and state.is_world_process_zero:
                path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                print(f"branch checkpoint: {path} (branch CAGE: --method cage --resume_from_checkpoint {path})")
            return control

    return SaveAtSilenceEnd()


def block_decay_trainer_class(base=None):
    """``base`` (default ``transformers.Trainer``) whose weight decay follows hf-cage's policy on the dense model:
    only the block linears ``args.quant_config()`` targets (what ``CAGETrainer`` decays in the QAT runs), not
    ``embed_tokens`` / ``lm_head`` / norms, so the BF16 baseline is like-for-like with STE and CAGE."""
    from transformers import Trainer

    from hf_cage.optim import decay_parameter_names

    class BlockDecayTrainer(base or Trainer):
        def get_decay_parameter_names(self, model) -> list[str]:
            return decay_parameter_names(model, self.args.quant_config())

    return BlockDecayTrainer


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
    """``bf16`` -> ``base`` with CAGETrainer's weight-decay policy (:func:`block_decay_trainer_class`);
    ``plain`` -> ``base``; ``ste`` / ``cage`` -> ``hf_cage.CAGETrainerMixin`` over ``base``.

    ``base`` is the Trainer class (default ``transformers.Trainer``, with ``default_data_collator`` over the
    token blocks; the SFT recipe passes TRL's ``SFTTrainer``); ``trainer_kwargs`` go to its constructor.
    ``plain`` is for a model quantized beforehand whose quantized weights are all frozen (LoRA): STE
    training needs no more than the model's own ``QATLinear`` forward. ``branch_checkpoint`` adds
    :func:`branch_checkpoint_callback` (``--save_branch_checkpoint``). A checkpoint to resume from is checked
    to hold exactly the model's tensors (:func:`check_resume_tensors`).
    """
    from transformers import Trainer, default_data_collator

    from hf_cage import CAGETrainer, CAGETrainerMixin

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
            callbacks=[branch_checkpoint_callback(training_args.cage_silence_ratio)] if branch_checkpoint else None,
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
        plot_loss_curve(log_history, out / "loss_curve.png", title=f"{metrics['method']} ({out.name})")


def plot_loss_curve(log_history: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Training loss (and validation loss, if logged) against optimizer step; CAGE's lambda on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, style, label in (("loss", "-", "training loss"), ("eval_loss", "o-", "validation loss")):
        points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    lambdas = [(e["step"], e["cage/lambda"]) for e in log_history if "cage/lambda" in e and "step" in e]
    if any(v for _, v in lambdas):
        twin = ax.twinx()
        twin.plot(*zip(*lambdas), ":", color="gray", label="CAGE lambda")
        twin.set_ylabel("CAGE lambda")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class Stopwatch:
    """Wall time of a run, from the start of ``main`` to the end of evaluation."""

    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start

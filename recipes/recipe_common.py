"""The recipe scripts' arguments: dataclasses, YAML presets, parsing, and the checks a run passes before it starts.

Kept beside the scripts (not in ``hf_cage``): it is recipe plumbing built on hf-cage's public API only.
The scripts import it as a top-level module, which works because Python puts a script's own folder
first on ``sys.path`` (``python recipes/x.py`` and ``accelerate launch recipes/x.py`` alike).
``recipe_training`` holds what they share after parsing.

Arguments come from dataclasses through ``transformers.HfArgumentParser``. ``--config FILE.yaml``
(or a preset name such as ``tiny``) supplies defaults as flat ``key: value`` pairs; flags given on the
command line override them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

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

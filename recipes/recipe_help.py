"""The recipes' ``--help``: their own flags first, CAGEConfig's, the common ``TrainingArguments`` flags, and every
other ``TrainingArguments`` flag only with ``--help-all`` (a recipe parser holds about 200 of them)."""

from __future__ import annotations

import argparse

# The transformers.TrainingArguments flags a recipe run is usually tuned with: ``--help`` lists them after the
# recipe's own flags and CAGEConfig's; ``--help-all`` adds every other TrainingArguments flag.
COMMON_TRAINING_FLAGS = (
    "output_dir",
    "max_steps",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "bf16",
    "use_cpu",
    "seed",
    "logging_steps",
    "save_strategy",
    "save_steps",
    "resume_from_checkpoint",
    "report_to",
)
HELP_ALL = "--help-all"


def help_sections(dataclass_types: tuple, full: bool) -> list[tuple[str, list[str]]]:
    """``(title, field names)`` in the order ``--help`` shows them: each recipe dataclass, then the
    ``TrainingArguments`` subclass's own fields (quantization, CAGE, and a TRL config's), then
    :data:`COMMON_TRAINING_FLAGS`, then (``full``) every other ``TrainingArguments`` field."""
    import dataclasses

    from transformers import TrainingArguments

    base = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    sections = []
    for dtype in dataclass_types:
        names = [f.name for f in dataclasses.fields(dtype) if f.init]
        if issubclass(dtype, TrainingArguments):
            own = [n for n in names if n not in set(base)]
            sections.append((f"{dtype.__name__}: its fields beyond TrainingArguments (quantization, CAGE, ...)", own))
            common = [n for n in COMMON_TRAINING_FLAGS if n in base]
            sections.append((f"training (transformers.TrainingArguments; {HELP_ALL} lists all)", common))
            if full:
                sections.append(("every other TrainingArguments flag", [n for n in base if n not in common]))
        else:
            title = (dtype.__doc__ or dtype.__name__).strip().splitlines()[0].rstrip(".")
            sections.append((f"{dtype.__name__}: {title}", names))
    return sections


def format_help(parser: argparse.ArgumentParser, dataclass_types: tuple, full: bool) -> str:
    """The recipe's help: its own flags first, the common ``TrainingArguments`` flags after, all of them only
    with ``full`` (``--help-all``). Each flag appears once, under the section of the field it sets."""
    shown = argparse.ArgumentParser(
        prog=parser.prog,
        usage=f"%(prog)s [--config PRESET] [--method METHOD] [--FLAG VALUE ...]  ({HELP_ALL}: every flag)",
        description=parser.description,
        formatter_class=parser.formatter_class,
        add_help=False,
    )
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        by_dest.setdefault(action.dest, []).append(action)
    first = shown.add_argument_group("help")
    first._add_action(next(a for a in parser._actions if isinstance(a, argparse._HelpAction)))
    first.add_argument(
        HELP_ALL, action="store_true", default=argparse.SUPPRESS, help="Also list every TrainingArguments flag."
    )
    listed = set()
    for title, names in help_sections(dataclass_types, full):
        group = shown.add_argument_group(title)
        for name in names:
            for action in by_dest.get(name, []):
                group._add_action(action)
            listed.add(name)
    epilog = "Defaults shown are the flags' own: a --config preset replaces them, and flags given replace the preset."
    hidden = len(set(by_dest) - listed - {"help"})
    if hidden:
        epilog += f" {hidden} more transformers.TrainingArguments flags work as well: {HELP_ALL} lists them."
    shown.epilog = epilog
    return shown.format_help()

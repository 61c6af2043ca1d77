"""The ``hf-cage`` command line: subcommands are registered in :data:`SUBCOMMANDS`."""

from __future__ import annotations

import argparse
import sys

# name -> (module, help); each module has ``add_parser(subparsers)`` and ``run(args) -> int``.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "export": ("hf_cage.cli.export", "pack a trained QAT checkpoint into a low-bit one; optionally push to the Hub"),
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="hf-cage",
        description=(
            "hf-cage's command line: turn a trained CAGE / STE QAT checkpoint into a packed low-bit checkpoint "
            "(and publish it to the Hub). Training runs in Python (hf_cage.CAGETrainer) or with the recipes "
            "of the source checkout (recipes/pretrain_llama.py, recipes/finetune_llama.py)."
        ),
        epilog="Run `hf-cage COMMAND --help` for the options of a command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, _help) in SUBCOMMANDS.items():
        importlib.import_module(module).add_parser(subparsers, name, _help)
    return parser


# Exit code of a command line that names no command (argparse's code for a usage error).
EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` names; with no command, print the help on stderr and return :data:`EXIT_USAGE`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``hf-cage`` command line: subcommands are registered in :data:`SUBCOMMANDS`."""

from __future__ import annotations

import argparse
import sys

# name -> (module, help); each module has ``add_parser(subparsers)`` and ``run(args) -> int``.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "export": ("hf_cage.cli.export", "pack a trained QAT checkpoint into a low-bit one; optionally push to the Hub"),
}


# Exit code of a command line that names no command (argparse's code for a usage error).
EXIT_USAGE = 2


def usage_error(parser: argparse.ArgumentParser) -> int:
    """Print ``parser``'s help on stderr and return :data:`EXIT_USAGE` (what ``hf-cage`` alone does)."""
    parser.print_help(sys.stderr)
    return EXIT_USAGE


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
    # No command: the help on stderr and argparse's usage-error code; a command's parser replaces ``run``.
    parser.set_defaults(run=lambda args: usage_error(parser))
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, _help) in SUBCOMMANDS.items():
        importlib.import_module(module).add_parser(subparsers, name, _help)
    return parser


# Exit code of a command interrupted by Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return args.run(args)
    except KeyboardInterrupt:  # during start-up (imports, parsing); a command handles its own work's interrupts
        print("hf-cage: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

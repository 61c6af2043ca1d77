"""The command line: ``run`` and ``report``."""

from __future__ import annotations

import argparse

from .plans import PLANS, command_run
from .problems import RESULTS
from .report import command_report


def main(argv: list[str] | None = None, doc: str | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; ``doc`` heads ``--help``. Returns the exit
    code."""
    parser = argparse.ArgumentParser(description=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every study (or one) that is not finished")
    run.add_argument("--study", choices=["all", *PLANS], default="all")
    run.add_argument("--results", default=str(RESULTS))
    report = sub.add_parser("report", help="print the tables (markdown); --plot writes the figure")
    report.add_argument("--results", default=str(RESULTS))
    report.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    return command_run(args) if args.command == "run" else command_report(args)

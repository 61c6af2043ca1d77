"""The command line: ``run``, ``one``, ``served``, ``plan`` and ``report``."""

from __future__ import annotations

import argparse

from .orchestrate import command_one, command_plan, command_run
from .report import command_report
from .served import command_served
from .spec import REPO, RESULTS, STUDIES


def main(argv: list[str] | None = None, doc: str | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; ``doc`` heads ``--help``. Returns the exit
    code."""
    parser = argparse.ArgumentParser(description=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the runs that are not finished yet")
    run.add_argument(
        "--out", default="outputs/accuracy", help="checkpoints, models and logs (default: outputs/accuracy)"
    )
    run.add_argument("--results", default=str(RESULTS), help="results folder (default: benchmarks/results)")
    run.add_argument("--workers", type=int, default=2, help="training processes at a time (default: 2)")
    run.add_argument(
        "--study", default=None, help=f"comma-separated studies to run (default: all: {', '.join(STUDIES)})"
    )
    run.add_argument("--only", default=None, help="comma-separated substrings of run keys to train")
    run.add_argument("--quick", action="store_true", help="a seconds-long smoke run of the whole pipeline")
    run.add_argument(
        "--code-commit",
        default="HEAD",
        help="train with hf_cage at this commit (default: HEAD), or per study: pretrain=SHA,map=SHA",
    )
    run.set_defaults(func=command_run)
    one = sub.add_parser("one", help="train one run (used by `run`)")
    one.add_argument("--spec", required=True)
    one.add_argument("--out", required=True)
    one.add_argument("--result-file", required=True)
    one.set_defaults(func=command_one)
    served = sub.add_parser("served", help="export the saved QAT runs and measure the served loss")
    served.add_argument("--out", default="outputs/accuracy")
    served.add_argument("--results", default=str(RESULTS))
    served.set_defaults(func=command_served)
    plan = sub.add_parser("plan", help="runs left and their cost")
    plan.add_argument("--results", default=str(RESULTS))
    plan.set_defaults(func=command_plan)
    report = sub.add_parser("report", help="print the tables and draw the plot from finished runs")
    report.add_argument("--results", default=str(RESULTS))
    report.add_argument("--out", default="outputs/accuracy")
    report.add_argument("--docs", default=str(REPO / "docs"), help="where --write-docs writes (default: docs/)")
    report.add_argument("--write-docs", action="store_true", help="write the tables into DOCS/results.md and the plot")
    report.set_defaults(func=command_report)
    args = parser.parse_args(argv)
    return args.func(args)

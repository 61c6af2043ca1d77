"""What the CPU speed benchmarks (``optimizer_step.py``, ``train_step.py``, ``peer.py``) share: the flags every one
of them takes, the fixed batch the step benchmarks train on, and where the results go.

Imported as a top-level module from the scripts' own folder (a test puts ``benchmarks/`` on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json


def speed_parser(doc: str, trials_help: str, tokens: bool = False) -> argparse.ArgumentParser:
    """A parser described by the first line of ``doc``, with ``--trials`` (``trials_help``: what a trial is and its
    default), ``--threads`` (torch intra-op threads, default 1) and ``--json``; with ``tokens``, also ``--batch``
    and ``--seq``, the shape of :func:`token_batch`. Every default left ``None`` is the script's to fill; parse
    with :func:`parse_speed_args`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--trials", type=int, default=None, help=trials_help)
    if tokens:
        parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8)")
        parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


def parse_speed_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser``'s arguments from ``argv``, with ``--threads`` applied (``torch.set_num_threads``)."""
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    return args


def token_batch(vocab_size: int, batch: int | None, seq: int | None, small: bool):
    """The one batch every variant steps on: token ids of shape ``(batch, seq)`` in ``[0, vocab_size)``, drawn with
    seed 0; ``batch`` / ``seq`` default to 8 x 256, or 2 x 32 for a ``small`` (smoke) run."""
    import torch

    shape = (batch or (2 if small else 8), seq or (32 if small else 256))
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(0))


def write_json(path: str | None, results: dict) -> None:
    """Write ``results`` to ``path`` as indented JSON; nothing when ``path`` is ``None`` (no ``--json``)."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)

"""``hf-cage export``: turn a trained QAT checkpoint into a packed 4-bit checkpoint, optionally published.

The command parses its flags, makes one library call (:func:`hf_cage.export_checkpoint`) and reports.
Exit codes: 0 done; 2 bad input (nothing written); 3 the operating system refused a write (nothing left
behind); 1 the push failed (the local export is kept); 130 interrupted (Ctrl-C or SIGTERM): nothing left
behind, except when the export was already complete (during the push), where it is kept and the message
says so.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

EXAMPLES = """\
examples:
  # default (--format auto): compressed-tensors (the model's grid) when stock loaders serve it as trained
  # (int quantizer, a_clip minmax, no Hadamard), else the hf-cage format, with one line saying why
  hf-cage export outputs/run/checkpoint-500 --output-dir exports/run-w4

  # MXFP4 / NVFP4 model (--quant_quantizer mxfp4 | nvfp4) -> mxfp4- / nvfp4-pack-quantized (stock transformers
  # computes it in bf16; Blackwell GPUs run FP4 natively)
  hf-cage export outputs/nvfp4-run --output-dir exports/nvfp4

  # QuEST / Hadamard model -> hf-cage format (exact, loads with hf_cage.load_quantized)
  hf-cage export outputs/quest-run --output-dir exports/quest --format hf-cage

  # W4A4 model, declare weights only (transformers / vLLM run it as W4A16; the difference is printed)
  hf-cage export outputs/run --output-dir exports/run-w4a16 --weights-only

  # shards of at most 2 GB plus model.safetensors.index.json
  hf-cage export outputs/run --output-dir exports/run --max-shard-size 2GB

  # export and publish in one commit (token from --token, HF_TOKEN or `hf auth login`)
  hf-cage export outputs/run --output-dir exports/run --push-to-hub me/llama-cage-w4 --private

exit codes: 0 success; 2 bad input, nothing written; 3 OS error while writing (permissions, disk full),
nothing left behind; 1 push failed, local export kept; 130 interrupted (Ctrl-C, SIGTERM): nothing left
behind, or, once the export is complete (during the push), the export kept, as the message says.
"""


def add_parser(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    from ..export.formats import FORMAT_CHOICES, FORMATS
    from ..export.options import DEFAULT_MAX_SHARD_SIZE, DTYPE_CHOICES

    parser = subparsers.add_parser(
        name,
        help=help,
        description=(
            "Pack the quantized linears of a trained hf-cage QAT model (integer codes packed into int32 words "
            "plus fp32 scales, or FP4 codes two per byte plus their group scales), write config, tokenizer and "
            "model card into --output-dir, measure and print how the served model compares with the trained one, "
            "and optionally push to the Hub. The export is "
            "written to a staging folder and renamed into place at the end."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoint",
        help="directory saved by save_pretrained / CAGETrainer.save_model, or a Trainer checkpoint-N directory",
    )
    parser.add_argument("--output-dir", "-o", required=True, help="where to write the export (must be empty)")
    parser.add_argument(
        "--format",
        choices=FORMAT_CHOICES,
        default="auto",
        help="auto (default): the compressed-tensors format of the model's grid when stock loaders serve the model "
        "as trained, else "
        "hf-cage (printed with the reason); " + "; ".join(f"{name}: {fmt.summary}" for name, fmt in FORMATS.items()),
    )
    parser.add_argument(
        "--weights-only",
        action="store_true",
        help="do not declare activation quantization in the compressed-tensors config (run as W4A16)",
    )
    parser.add_argument(
        "--allow-lossy",
        action="store_true",
        help="let compressed-tensors hold a model stock loaders cannot serve as trained (QuEST grid, Hadamard, "
        "another activation rule); prints the measured weight error and logit difference",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="dtype of the tensors left dense: embeddings, norms, lm_head (default auto: the checkpoint's own "
        "dtype, so the served model equals the trained one; bfloat16 halves them, the difference is printed)",
    )
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="largest weight file, as transformers' save_pretrained (default 50GB; decimal units KB, MB, GB, TB or "
        "binary KiB, MiB, GiB, or a byte count): bigger models are split into model-0000i-of-0000n.safetensors plus "
        "model.safetensors.index.json",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar over layers")
    card = parser.add_argument_group("model card")
    card.add_argument("--base-model", help="Hub id of the model this one was trained from (card metadata)")
    card.add_argument("--license", default="apache-2.0", help="license in the card metadata (default: apache-2.0)")
    card.add_argument(
        "--dataset", action="append", default=[], help="Hub id of a training dataset (repeat for several)"
    )
    card.add_argument("--model-name", help="title of the card (default: the repo name)")
    hub = parser.add_argument_group("push to the Hub")
    hub.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the export to this repo (e.g. me/llama-w4)")
    hub.add_argument("--private", action="store_true", help="create the repo as private")
    hub.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    hub.add_argument("--commit-message", help="message of the upload commit")
    hub.add_argument(
        "--token",
        help="Hub token (default: HF_TOKEN, then the saved login); never printed. HF_ENDPOINT picks the server",
    )
    parser.set_defaults(run=run)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"hf-cage export: error: {message}", file=sys.stderr)
    return code


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so the export's cleanup runs."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _folder_identity(path) -> tuple[int, int] | None:
    """``(device, inode)`` of a folder (an export replaces the folder, so this changes), or ``None``."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


def options_of(args: argparse.Namespace):
    """The :class:`~hf_cage.export.ExportOptions` the parsed flags ask for: every flag whose destination is a field
    of it (``--format`` -> ``format``, ``--push-to-hub`` -> ``push_to_hub``, ...), plus the card's flags."""
    from dataclasses import fields

    from ..export import CardOptions, ExportOptions

    card = CardOptions(
        base_model=args.base_model,
        license=args.license,
        datasets=list(args.dataset),
        model_name=args.model_name,
    )
    flags = {f.name: getattr(args, f.name) for f in fields(ExportOptions) if hasattr(args, f.name)}
    return ExportOptions(**flags, card=card, progress=not args.no_progress, log=print)


def run(args: argparse.Namespace) -> int:
    from ..export import ExportError, ExportWriteError, PushError, export_checkpoint

    options = options_of(args)
    before = _folder_identity(args.output_dir)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        result = export_checkpoint(args.checkpoint, args.output_dir, options)
    except ExportError as err:
        return _fail(str(err), 2)
    except ExportWriteError as err:
        return _fail(str(err.strerror or err), 3)
    except PushError as err:
        where = err.result.output_dir if err.result is not None else args.output_dir
        return _fail(f"push to {args.push_to_hub} failed ({err}); the export is kept in {where}", 1)
    except (KeyboardInterrupt, _Terminated):
        after = _folder_identity(args.output_dir)
        if after is not None and after != before:  # the new export was moved into place (e.g. during the push)
            return _fail(f"interrupted; the export is kept in {args.output_dir}", 130)
        return _fail("interrupted; nothing was written", 130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    ratio = result.size_bytes / result.bf16_size_bytes if result.bf16_size_bytes else float("nan")
    shards = f", {result.num_shards} shards" if result.num_shards > 1 else ""
    print(
        f"exported {result.num_layers} quantized layers to {result.output_dir} ({result.format}, dense "
        f"{result.dtype}, {result.size_bytes / 1e6:.2f} MB{shards}, {ratio:.1%} of bf16)"
    )
    if result.commit_url:
        print(f"pushed to {args.push_to_hub}: {result.commit_url}")
    return 0

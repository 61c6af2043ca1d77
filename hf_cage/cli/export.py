"""``hf-cage export``: turn a trained QAT checkpoint into a packed 4-bit checkpoint, optionally published.

Exit codes: 0 done; 2 bad input (nothing written); 1 the push failed (the local export is kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  # W4 int model -> compressed-tensors (loads in transformers and vLLM)
  hf-cage export outputs/run/checkpoint-500 --output-dir exports/run-w4

  # QuEST / Hadamard model -> hf-cage format (lossless, loads with hf_cage.load_quantized)
  hf-cage export outputs/quest-run --output-dir exports/quest --format hf-cage

  # W4A4 model, declare weights only (transformers / vLLM run it as W4A16)
  hf-cage export outputs/run --output-dir exports/run-w4a16 --weights-only

  # export and publish in one commit (token from --token, HF_TOKEN or `hf auth login`)
  hf-cage export outputs/run --output-dir exports/run --push-to-hub me/llama-cage-w4 --private

exit codes: 0 success; 2 bad input, nothing written; 1 push failed, local export kept.
"""


def add_parser(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description=(
            "Pack the quantized linears of a trained hf-cage QAT model (4-bit codes, 8 per int32, plus fp32 "
            "scales), write config, tokenizer and model card into --output-dir, and optionally push to the Hub. "
            "The export is written to a temporary directory and renamed at the end."
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
        choices=("compressed-tensors", "hf-cage"),
        default="compressed-tensors",
        help="compressed-tensors (default): pack-quantized, loads in transformers/vLLM, int quantizer only; "
        "hf-cage: any hf-cage grid (QuEST mid-rise, Hadamard), loads with hf_cage.load_quantized",
    )
    parser.add_argument(
        "--weights-only",
        action="store_true",
        help="do not declare activation quantization in the compressed-tensors config (run as W4A16)",
    )
    parser.add_argument(
        "--allow-lossy",
        action="store_true",
        help="let compressed-tensors re-quantize a QuEST/Hadamard model to the int grid; prints the measured "
        "weight error and logit difference",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="dtype of the tensors left dense: embeddings, norms, lm_head (default: bfloat16)",
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


def run(args: argparse.Namespace) -> int:
    from ..export import CardOptions, ExportError, PushError, TrainingInfo, export_model, load_checkpoint
    from ..export.api import check_output_dir
    from ..export.formats import check_format
    from ..export.hub import push_folder, resolve_token
    from ..export.source import check_checkpoint_dir

    token = None
    format_options = dict(weights_only=args.weights_only, allow_lossy=args.allow_lossy)
    try:
        if args.push_to_hub:
            token = resolve_token(args.token)
            if not token:
                raise ExportError(
                    "--push-to-hub needs a Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`"
                )
        if Path(args.output_dir).resolve() == Path(args.checkpoint).resolve():
            raise ExportError("--output-dir is the checkpoint itself; write the export to another directory")
        check_output_dir(args.output_dir, args.overwrite)
        # Refuse what the format cannot hold before loading any weights.
        check_format(check_checkpoint_dir(args.checkpoint), args.format, **format_options)
        model = load_checkpoint(args.checkpoint, progress=not args.no_progress)
        options = CardOptions(
            repo_id=args.push_to_hub,
            base_model=args.base_model,
            license=args.license,
            datasets=list(args.dataset),
            model_name=args.model_name,
        )
        result = export_model(
            model,
            args.output_dir,
            format=args.format,
            **format_options,
            dtype=args.dtype,
            overwrite=args.overwrite,
            training=TrainingInfo.from_dir(args.checkpoint),
            card=options,
            progress=not args.no_progress,
            log=print,
        )
    except ExportError as err:
        return _fail(str(err), 2)
    ratio = result.size_bytes / result.bf16_size_bytes if result.bf16_size_bytes else float("nan")
    print(
        f"exported {result.num_layers} quantized layers to {result.output_dir} ({result.format}, "
        f"{result.size_bytes / 1e6:.2f} MB, {ratio:.1%} of bf16)"
    )
    if not args.push_to_hub:
        return 0
    try:
        url = push_folder(
            result.output_dir,
            args.push_to_hub,
            token=token,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
        )
    except PushError as err:
        return _fail(f"push to {args.push_to_hub} failed ({err}); the export is kept in {result.output_dir}", 1)
    print(f"pushed to {args.push_to_hub}: {url}")
    return 0

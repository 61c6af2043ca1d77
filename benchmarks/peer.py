"""hf-cage QAT beside torchao QAT (the peer): time of a training step and of a forward pass, and the memory
autograd keeps for backward, at the formats both libraries support, CPU.

Formats (the same Llama's block linears quantized by each library; ``lm_head`` and embeddings stay dense in both):

- ``w4a16_g32`` / ``w4a16_g128``: int4 weights, symmetric, one scale per group of 32 / 128 inputs. hf-cage
  ``QuantConfig(quantizer="int", a_bits=None, granularity="group", clip="minmax")`` has torchao's rule,
  ``scale = absmax / 7.5``, codes in ``[-8, 7]``.
- ``w4a4_g32``: the weights above plus int4 activations per token. hf-cage: symmetric (``absmax / 7.5``, the
  rule compressed-tensors and vLLM serve); torchao refuses symmetric per-token activations
  (``NotImplementedError``), so its side runs asymmetric per-token activations (scale and zero point per token).
- ``quest_w4a4`` (hf-cage only, no torchao counterpart): the QuEST grid with 128-wide Hadamard rotations, the
  ``tiny`` preset's default, for reference.

Every variant trains with the same ``torch.optim.AdamW(foreach=True)`` (straight-through estimator, no CAGE
correction: the peer has none) on the same fixed batch, fp32 weights, one torch thread. Trials are interleaved
(one step of every variant per trial, in a fresh seeded order) after a warm-up, first whole training steps, then
forward passes (``torch.no_grad()``, evaluation); figures are medians, all from one run. Saved-for-backward
memory: the tensors autograd packs in one training forward (``torch.autograd.graph.saved_tensors_hooks``), one
count per storage, parameters excluded.

    pip install torchao==0.18.0                     # or: pip install -e ".[bench]"; never imported by hf_cage
    # (a separate environment: once installed, transformers imports torchao, whose CPU load warnings go to stderr)
    python benchmarks/peer.py                       # 4.5M-parameter Llama, 8 x 256 tokens, 7 trials
    python benchmarks/peer.py --trials 11 --json outputs/peer.json
    python benchmarks/peer.py --dry-run             # tiny model, 1 trial, hf-cage only: no torchao needed
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from speed_common import parse_speed_args, speed_parser, token_batch, write_json

FORMATS = {
    "w4a16_g32": dict(group_size=32, activations=False),
    "w4a16_g128": dict(group_size=128, activations=False),
    "w4a4_g32": dict(group_size=32, activations=True),
}
QUEST = dict(w_bits=4, a_bits=4, quantizer="quest")
# Hidden 128: the smallest width every format (groups of 128) takes.
DRY_RUN = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, vocab_size=256)
MIB = 2**20


def load_train_step():
    """The machinery of ``benchmarks/train_step.py`` (model, interleaved timer, step functions)."""
    spec = importlib.util.spec_from_file_location(
        "hf_cage_bench_train_step", Path(__file__).with_name("train_step.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hf_cage_config(fmt: dict):
    from hf_cage import QuantConfig

    a_bits = 4 if fmt["activations"] else None
    return QuantConfig(
        w_bits=4, a_bits=a_bits, quantizer="int", granularity="group", group_size=fmt["group_size"], clip="minmax"
    )


def torchao_prepare(model, fmt: dict, names: set[str]):
    """torchao QAT ``prepare`` on the linears named in ``names`` (the ones hf-cage quantizes)."""
    import torch
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    weight = IntxFakeQuantizeConfig(torch.int4, group_size=fmt["group_size"])
    # Symmetric per-token activations raise NotImplementedError in torchao 0.18: asymmetric is the closest.
    activation = IntxFakeQuantizeConfig(torch.int4, "per_token", is_symmetric=False) if fmt["activations"] else None
    config = QATConfig(activation_config=activation, weight_config=weight, step="prepare")
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)
    return model


def make_variants(bench, shape: dict, formats: list[str], with_peer: bool) -> dict:
    """``{name: (model, AdamW, "auto")}``: ``bf16``, ``hf_cage/<format>``, ``torchao/<format>`` (``with_peer``),
    ``hf_cage/quest_w4a4``."""
    from torch import nn

    from hf_cage import QuantConfig, quantize_model, quantized_layers

    dense = bench.build_model(shape)
    variants = {"bf16": (dense, bench.adamw(dense), "auto")}
    for name in formats:
        model = quantize_model(bench.build_model(shape), hf_cage_config(FORMATS[name]))
        variants[f"hf_cage/{name}"] = (model, bench.adamw(model), "auto")
        if with_peer:
            names = {fqn for fqn, _ in quantized_layers(model)}
            peer = torchao_prepare(bench.build_model(shape), FORMATS[name], names)
            wrapped = [m for m in peer.modules() if isinstance(m, nn.Linear) and type(m) is not nn.Linear]
            if len(wrapped) != len(names):
                raise RuntimeError(f"torchao wrapped {len(wrapped)} linears, hf-cage {len(names)}: not comparable")
            variants[f"torchao/{name}"] = (peer, bench.adamw(peer), "auto")
    model = quantize_model(bench.build_model(shape), QuantConfig(**QUEST))
    variants["hf_cage/quest_w4a4"] = (model, bench.adamw(model), "auto")
    return variants


def main(argv: list[str] | None = None) -> dict:
    parser = speed_parser(__doc__, "interleaved trials per variant (default 7)", tokens=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny model, 1 trial, hf-cage only (no torchao)")
    parser.add_argument("--format", choices=sorted(FORMATS), action="append", help="default: all")
    args = parse_speed_args(parser, argv)

    import torch

    bench = load_train_step()
    shape = DRY_RUN if args.dry_run else bench.FULL
    ids = token_batch(shape["vocab_size"], args.batch, args.seq, small=args.dry_run)
    batch, seq = ids.shape
    trials = args.trials or (1 if args.dry_run else 7)
    formats = args.format or list(FORMATS)
    variants = make_variants(bench, shape, formats, with_peer=not args.dry_run)
    step_s, _ = bench.time_variants(variants, ids, trials, step=bench.train_step)
    forward_s, _ = bench.time_variants(variants, ids, trials, seed=1, step=bench.forward_step)
    saved = {name: bench.saved_bytes(model, ids) for name, (model, _, _) in variants.items()}
    results = {
        "threads": torch.get_num_threads(), "trials": trials, "batch": batch, "seq": seq,
        "params": sum(p.numel() for p in variants["bf16"][0].parameters()),
        "step_median_s": step_s, "forward_median_s": forward_s, "saved_bytes": saved, "rows": {},
    }  # fmt: skip
    print(
        f"{results['params'] / 1e6:.2f}M parameters, {batch} x {seq} tokens, {trials} trials, "
        f"{results['threads']} thread(s); BF16 (fp32 on CPU): step {step_s['bf16'] * 1e3:.0f} ms, forward "
        f"{forward_s['bf16'] * 1e3:.0f} ms, saved for backward {saved['bf16'] / MIB:.0f} MiB"
    )
    print(
        "| format | library | step (ms) | step / BF16 | forward (ms) | forward / BF16 | saved for backward (MiB) "
        "| saved / BF16 | step / torchao | forward / torchao |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in [*formats, "quest_w4a4"]:
        for library in ("hf_cage", "torchao"):
            key = f"{library}/{name}"
            if key not in variants:
                continue
            peer = f"torchao/{name}"
            row = {
                "step_over_bf16": step_s[key] / step_s["bf16"],
                "forward_over_bf16": forward_s[key] / forward_s["bf16"],
                "saved_over_bf16": saved[key] / saved["bf16"],
            }
            if peer in variants:
                row["step_over_torchao"] = step_s[key] / step_s[peer]
                row["forward_over_torchao"] = forward_s[key] / forward_s[peer]
            results["rows"][key] = row
            vs_peer = (
                f"{row['step_over_torchao']:.3f} | {row['forward_over_torchao']:.3f}" if peer in variants else "- | -"
            )
            print(
                f"| {name} | {library} | {step_s[key] * 1e3:.0f} | {row['step_over_bf16']:.3f} | "
                f"{forward_s[key] * 1e3:.0f} | {row['forward_over_bf16']:.3f} | {saved[key] / MIB:.0f} | "
                f"{row['saved_over_bf16']:.3f} | {vs_peer} |"
            )
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)

"""Time of a whole training step (forward, backward, optimizer) of a Llama: unquantized vs STE vs CAGE, CPU.

Variants, all fp32 weights with AdamW(foreach) on the same fixed batch (token ids drawn once, seeded):

- ``bf16``: the unquantized model, the baseline the W4A4 targets are stated against (the "BF16" run of the
  recipes; on CPU it runs fp32 here, as every variant does);
- per quantizer (``quest_w4a4``: QuEST grid with Hadamard rotations; ``int_w4a4``: integer grid, no rotation),
  one quantized copy trained three ways: ``ste`` (``cage_lambda=0``), ``cage_silence`` (the correction
  attached, in its silence period) and ``cage_active`` (the correction applied every step).

Trials are interleaved (one step of each variant, in a fresh seeded random order per trial) after a warm-up step
each; the reported time is the median over trials, so load from other processes hits every variant alike, and
all ratios come from the same run. The time inside ``optimizer.step()`` is also recorded per variant: the
correction's own cost is the difference of those medians, far less noisy than the difference of whole steps on
a loaded machine. One torch thread by default.

    .venv/bin/python benchmarks/train_step.py                     # 4.5M-parameter Llama, 8 x 256 tokens
    .venv/bin/python benchmarks/train_step.py --quick             # tiny model, 2 trials (used by a test)
    .venv/bin/python benchmarks/train_step.py --trials 9 --profile --json outputs/train_step.json
    .venv/bin/python benchmarks/train_step.py --quantizer quest_w4a4 --rotation-baseline   # fast vs dense rotation

``--profile`` adds the top operators (self CPU time) of one step of each STE variant, from torch.profiler.

Targets (issue 10): CAGE active / STE <= 1.05; STE W4A4 / BF16 <= 1.3 on CPU.
"""

from __future__ import annotations

import statistics
import sys
import time

from speed_common import parse_speed_args, speed_parser, token_batch, write_json

FULL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, vocab_size=2048)
QUICK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
QUANTIZERS = {
    "quest_w4a4": dict(w_bits=4, a_bits=4, quantizer="quest"),
    "int_w4a4": dict(w_bits=4, a_bits=4, quantizer="int"),
}


def build_model(shape: dict, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], tie_word_embeddings=False)
    return LlamaForCausalLM(config).train()


def adamw(model):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), foreach=True)


def make_variants(shape: dict, quantizers: list[str], rotation_baseline: bool = False) -> dict:
    """``{name: (model, optimizer, path)}``; the variants of one quantizer share one quantized model.

    ``path`` is ``"auto"``, or ``"matmul"`` for the ``<quantizer>/ste@matmul`` baseline that ``rotation_baseline``
    adds to quantizers with a Hadamard rotation: the CPU path before issue 23 (dense matmul rotations,
    ``FakeQuantSTE`` per operand + ``F.linear``), measured in the same run (:func:`cpu_path`).
    """
    from hf_cage import QuantConfig, create_cage_optimizer, quantize_model

    common = dict(lr=1e-6, weight_decay=0.1, foreach=True)
    dense = build_model(shape)
    variants = {"bf16": (dense, adamw(dense), "auto")}
    for name in quantizers:
        config = QuantConfig(**QUANTIZERS[name])
        model = quantize_model(build_model(shape), config)
        schedule = dict(cage_lambda=10.0, total_steps=10**9, cage_schedule="constant")
        ste = create_cage_optimizer(model, cage_lambda=0.0, **common)
        variants[f"{name}/ste"] = (model, ste, "auto")
        variants[f"{name}/cage_silence"] = (
            model, create_cage_optimizer(model, cage_silence_ratio=0.99, **schedule, **common), "auto"
        )  # fmt: skip
        variants[f"{name}/cage_active"] = (
            model, create_cage_optimizer(model, cage_silence_ratio=0.0, **schedule, **common), "auto"
        )  # fmt: skip
        if rotation_baseline and config.hadamard:
            variants[f"{name}/ste@matmul"] = (model, ste, "matmul")
    return variants


def cpu_path(path: str):
    """Context for a variant's ``path``: ``"matmul"`` runs the dense rotation and the unfused straight-through
    linear (:func:`hf_cage.kernels.reference.rotation`, :func:`hf_cage.quant.ste.fused_linear`)."""
    import contextlib

    from hf_cage.kernels.reference import rotation
    from hf_cage.quant.ste import fused_linear

    stack = contextlib.ExitStack()
    if path == "matmul":
        stack.enter_context(rotation("matmul"))
        stack.enter_context(fused_linear(False))
    return stack


def train_step(model, optimizer, ids) -> float:
    """One step; returns the seconds spent in ``optimizer.step()`` (the part CAGE adds to)."""
    model(input_ids=ids, labels=ids).loss.backward()
    start = time.perf_counter()
    optimizer.step()
    optimizer_s = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=True)
    return optimizer_s


def forward_step(model, optimizer, ids) -> float:
    """A forward pass without autograd (evaluation); no optimizer time."""
    import torch

    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    return 0.0


def saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for the backward of one training step: every tensor packed by
    ``torch.autograd.graph.saved_tensors_hooks``, counted once per storage, parameters excluded (they live anyway)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(storages.values())


def time_variants(
    variants: dict, ids, trials: int, seed: int = 0, step=train_step
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per ``step`` (default: a whole training step) and per optimizer step of each variant.

    Each trial runs one step of every variant, in a fresh random order (seeded), so neither machine load nor
    the position in a trial favours a variant.
    """
    import random

    rng = random.Random(seed)
    for model, opt, path in variants.values():  # warm-up: allocations, Adam moments, Hadamard matrices
        with cpu_path(path):
            step(model, opt, ids)
    step_s = {name: [] for name in variants}
    optimizer_s = {name: [] for name in variants}
    names = list(variants)
    for _ in range(trials):
        rng.shuffle(names)
        for name in names:
            model, opt, path = variants[name]
            with cpu_path(path):
                start = time.perf_counter()
                optimizer_s[name].append(step(model, opt, ids))
                step_s[name].append(time.perf_counter() - start)
    median = statistics.median
    return {n: median(v) for n, v in step_s.items()}, {n: median(v) for n, v in optimizer_s.items()}


def profile(variants: dict, ids, names: list[str], top: int = 12) -> dict[str, list[dict]]:
    """Top operators by self CPU time of one step of each named variant."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tables = {}
    for name in names:
        model, opt, _ = variants[name]
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(model, opt, ids)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        tables[name] = [
            {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count}
            for e in events[:top]
        ]  # fmt: skip
    return tables


def main(argv: list[str] | None = None) -> dict:
    parser = speed_parser(__doc__, "interleaved trials per variant (default 7)", tokens=True)
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 x 32 tokens, 2 trials (smoke test)")
    parser.add_argument("--quantizer", choices=sorted(QUANTIZERS), action="append", help="default: all")
    parser.add_argument("--profile", action="store_true", help="also profile one step of each STE variant")
    parser.add_argument(
        "--rotation-baseline",
        action="store_true",
        help="also time STE on the CPU path before issue 23 (<quantizer>/ste@matmul: dense rotations, unfused STE)",
    )
    args = parse_speed_args(parser, argv)

    import torch

    shape = QUICK if args.quick else FULL
    ids = token_batch(shape["vocab_size"], args.batch, args.seq, small=args.quick)
    batch, seq = ids.shape
    trials = args.trials or (2 if args.quick else 7)
    quantizers = args.quantizer or sorted(QUANTIZERS)
    variants = make_variants(shape, quantizers, args.rotation_baseline)
    medians, optimizer_medians = time_variants(variants, ids, trials)
    params = sum(p.numel() for p in variants["bf16"][0].parameters())
    results = {
        "threads": torch.get_num_threads(), "trials": trials, "batch": batch, "seq": seq, "params": params,
        "median_s": medians, "optimizer_median_s": optimizer_medians, "saved_bytes": {}, "runs": {},
    }  # fmt: skip
    base = medians["bf16"]
    print(f"{params / 1e6:.2f}M parameters, {batch} x {seq} tokens, {trials} trials, {results['threads']} thread(s)")
    print(f"BF16 (unquantized, fp32 on CPU): {base * 1e3:.0f} ms / step")
    print(
        "| quantizer | STE (ms) | CAGE silence (ms) | CAGE active (ms) | STE / BF16 | silence / STE | active / STE "
        "| optimizer step STE / silence / active (ms) | correction / STE step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in quantizers:
        ste, silence, active = (medians[f"{name}/{v}"] for v in ("ste", "cage_silence", "cage_active"))
        opt_ste, opt_silence, opt_active = (
            optimizer_medians[f"{name}/{v}"] for v in ("ste", "cage_silence", "cage_active")
        )
        run = {
            "ste_over_bf16": ste / base, "silence_over_ste": silence / ste, "active_over_ste": active / ste,
            # The correction's own cost (the optimizer-step difference, far less noisy than whole steps) per STE step.
            "correction_over_ste_step": (opt_active - opt_ste) / ste,
        }  # fmt: skip
        if f"{name}/ste@matmul" in medians:
            run["ste_matmul_rotation_over_bf16"] = medians[f"{name}/ste@matmul"] / base
        results["runs"][name] = run
        print(
            f"| {name} | {ste * 1e3:.0f} | {silence * 1e3:.0f} | {active * 1e3:.0f} | {run['ste_over_bf16']:.3f} | "
            f"{run['silence_over_ste']:.3f} | {run['active_over_ste']:.3f} | {opt_ste * 1e3:.1f} / "
            f"{opt_silence * 1e3:.1f} / {opt_active * 1e3:.1f} | {run['correction_over_ste_step']:.3f} |"
        )
    for name, run in results["runs"].items():
        if "ste_matmul_rotation_over_bf16" in run:
            print(
                f"{name} STE on the path before (dense rotations, unfused): "
                f"{run['ste_matmul_rotation_over_bf16']:.3f} x BF16"
            )
    for name, (model, _, path) in variants.items():
        if name == "bf16" or name.endswith(("/ste", "/ste@matmul")):
            with cpu_path(path):
                results["saved_bytes"][name] = saved_bytes(model, ids)
    print(
        "saved for backward (MiB; ratio to BF16): "
        + ", ".join(
            f"{n} {b / 2**20:.0f} ({b / results['saved_bytes']['bf16']:.2f})"
            for n, b in results["saved_bytes"].items()
        )
    )
    if args.profile:
        results["profile"] = profile(variants, ids, ["bf16"] + [f"{name}/ste" for name in quantizers])
        for name, rows in results["profile"].items():
            print(f"\n{name}: top operators by self CPU time (one step)")
            for row in rows:
                print(f"  {row['share']:6.1%} {row['self_ms']:8.1f} ms {row['calls']:5d}x  {row['op']}")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)

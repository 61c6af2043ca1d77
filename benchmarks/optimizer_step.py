"""Time of one CAGE optimizer step against ``torch.optim.AdamW(foreach=True)`` on a quantized Llama, CPU.

Both optimizers update the same parameters (a ~25M-parameter Llama quantized with hf-cage) with the
same fixed gradients, in the same process. Trials alternate between the optimizers (AdamW, CAGE in
silence, CAGE with the correction active, AdamW, ...) and the reported time is the median over
trials, so load from other processes on the machine hits every optimizer alike.

    .venv/bin/python benchmarks/optimizer_step.py              # full run, ~25M parameters
    .venv/bin/python benchmarks/optimizer_step.py --quick      # tiny model, a few trials (used by a test)
    .venv/bin/python benchmarks/optimizer_step.py --trials 31 --json outputs/optimizer_step.json
    .venv/bin/python benchmarks/optimizer_step.py --quantizer quest_w4a4 --rotation-baseline  # fast vs dense rotation

Targets (issue 3): CAGE / AdamW <= 1.05 in silence, <= 1.5 with the correction active.
"""

from __future__ import annotations

import statistics
import sys
import time

from speed_common import parse_speed_args, speed_parser, write_json

FULL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8, vocab_size=6144)
QUICK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
QUANTIZERS = {
    "quest_w4a4": dict(w_bits=4, a_bits=4, quantizer="quest"),
    "int_w4": dict(w_bits=4, a_bits=None, quantizer="int", clip="absmax"),
}


def build_model(shape: dict, quant: dict, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_cage import QuantConfig, quantize_model

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], tie_word_embeddings=False)
    model = quantize_model(LlamaForCausalLM(config), QuantConfig(**quant))
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return model


def make_optimizers(model) -> dict:
    import torch

    from hf_cage import create_cage_optimizer

    common = dict(lr=1e-6, weight_decay=0.1, foreach=True)
    silent = create_cage_optimizer(model, cage_lambda=10.0, cage_silence_ratio=0.99, total_steps=10**9, **common)
    active = create_cage_optimizer(
        model, cage_lambda=10.0, cage_silence_ratio=0.0, cage_schedule="constant", total_steps=10**9, **common
    )
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in silent.param_groups]
    adamw = torch.optim.AdamW(groups, lr=1e-6, betas=(0.9, 0.95), foreach=True)
    return {"adamw_foreach": adamw, "cage_silence": silent, "cage_active": active}


def time_steps(optimizers: dict, trials: int, steps_per_trial: int) -> dict[str, float]:
    """Median seconds per step of each optimizer, trials alternating between optimizers. A name ending in
    ``@matmul`` steps with the dense matmul rotation (:func:`hf_cage.kernels.reference.rotation`)."""
    import contextlib

    from hf_cage.kernels.reference import rotation

    def method(name):
        return rotation("matmul") if name.endswith("@matmul") else contextlib.nullcontext()

    for name, opt in optimizers.items():  # warm-up: creates the moments
        with method(name):
            opt.step()
    times = {name: [] for name in optimizers}
    for _ in range(trials):
        for name, opt in optimizers.items():
            with method(name):
                start = time.perf_counter()
                for _ in range(steps_per_trial):
                    opt.step()
                times[name].append((time.perf_counter() - start) / steps_per_trial)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = speed_parser(__doc__, "alternating trials per optimizer (default 15)")
    parser.add_argument("--quick", action="store_true", help="tiny model and 3 trials (smoke test)")
    parser.add_argument("--steps-per-trial", type=int, default=1)
    parser.add_argument("--quantizer", choices=sorted(QUANTIZERS), action="append", help="default: all")
    parser.add_argument(
        "--rotation-baseline",
        action="store_true",
        help="also time the active step with the dense matmul rotation (cage_active@matmul), the path before",
    )
    args = parse_speed_args(parser, argv)

    import torch

    shape = QUICK if args.quick else FULL
    trials = args.trials or (3 if args.quick else 15)
    results = {"threads": torch.get_num_threads(), "trials": trials, "runs": {}}
    print(
        "| quantizer | params | AdamW foreach (ms) | CAGE silence (ms) | CAGE active (ms) "
        "| silence ratio | active ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.quantizer or sorted(QUANTIZERS):
        model = build_model(shape, QUANTIZERS[name])
        n_params = sum(p.numel() for p in model.parameters())
        optimizers = make_optimizers(model)
        if args.rotation_baseline and QUANTIZERS[name]["quantizer"] == "quest":
            optimizers["cage_active@matmul"] = optimizers["cage_active"]
        medians = time_steps(optimizers, trials, args.steps_per_trial)
        base = medians["adamw_foreach"]
        run = {
            "params": n_params,
            "median_s": medians,
            "silence_ratio": medians["cage_silence"] / base,
            "active_ratio": medians["cage_active"] / base,
        }
        if "cage_active@matmul" in medians:
            run["active_matmul_rotation_ratio"] = medians["cage_active@matmul"] / base
        results["runs"][name] = run
        print(
            f"| {name} | {n_params / 1e6:.1f}M | {base * 1e3:.1f} | {medians['cage_silence'] * 1e3:.1f} | "
            f"{medians['cage_active'] * 1e3:.1f} | {run['silence_ratio']:.3f} | {run['active_ratio']:.3f} |"
        )
        if "active_matmul_rotation_ratio" in run:
            print(
                f"  {name} active with the dense matmul rotation (before): {run['active_matmul_rotation_ratio']:.3f}"
            )
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)

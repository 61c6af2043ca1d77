"""`make gpu-check`: everything the first GPU has to show about hf-cage's kernels, in one command (< 8 min on one
H100/H200), with the results table written into docs/kernels.md.

    python scripts/gpu_check.py                     # on a CUDA machine: tests, kernel and training-step benchmarks
    python scripts/gpu_check.py --dry-run --docs /tmp/kernels.md   # CPU: the same wiring on tiny shapes

Stages, each timed:

1. ``pytest -m gpu`` (the compiled kernels at Llama sizes against the CPU twins, offsets past 2^31, autotuning);
2. ``benchmarks/kernels.py`` at K = N = 4096, M = 1, 16, 2048, 8192: W4A4 and W4A16 against bf16 ``torch.matmul``
   and ``torch._int_mm``, each kernel checked against the benchmark's own oracle;
3. a QAT training step on the GPU (bf16 autocast, AdamW): BF16 (unquantized) vs STE (QuEST W4A4, ``cage_lambda=0``)
   vs CAGE (the correction active every step). ``benchmarks/train_step.py`` is CPU-only (no device flag), so the
   step is timed here, with CUDA synchronization.

Then the table goes between the ``gpu-check`` markers of ``--docs`` (atomically). The dry run uses CPU tensors,
the torch twins, tiny shapes and one timed step; its table says it is not a measurement. Exit code 0 when every
stage passed, 1 when one failed (the table is written either way), 2 for bad usage (no CUDA without --dry-run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "kernels.md"
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
KERNEL_M = (1, 16, 2048, 8192)
KERNEL_KN = "4096,4096"
TARGETS = {"w4a16_m1": 2.0, "w4a4_large_m": 1.7}
# ~270M-parameter Llama (Llama-2-7B widths at 4 layers), 4 x 1024 tokens: a few seconds per variant on an H100.
GPU_MODEL = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16, vocab_size=32000
)
CPU_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="example: make gpu-check")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the wiring, measures nothing")
    parser.add_argument("--docs", default=None, help=f"markdown file to write the table into (default {DOCS})")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per variant (default 10)")
    return parser.parse_args(argv)


def run_pytest(dry_run: bool) -> dict:
    """``pytest -m gpu``; the dry run collects the GPU test file only (they skip without CUDA)."""
    targets = [str(ROOT / "tests" / "test_kernels_gpu.py")] if dry_run else [str(ROOT / "tests")]
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *targets]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(result.stdout[-3000:], result.stderr[-2000:], sep="\n")
    return {"ok": result.returncode == 0, "summary": summary}


def load_kernel_benchmark():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_kernel_benchmark(dry_run: bool) -> dict:
    bench = load_kernel_benchmark()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        args = ["--dry-run"] if dry_run else ["--m", *map(str, KERNEL_M), "--kn", KERNEL_KN]
        rc = bench.main([*args, "--json", str(out)])
        data = json.loads(out.read_text())
    data["ok"] = rc == 0
    return data


def _step_variants(shape: dict, device: str):
    """``{name: (model, optimizer)}``: BF16 (unquantized), STE and CAGE on QuEST W4A4, built on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_cage import QuantConfig, create_cage_optimizer, quantize_model

    def model():
        torch.manual_seed(0)
        config = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], tie_word_embeddings=False)
        return LlamaForCausalLM(config).to(device).train()

    dense = model()
    variants = {"BF16": (dense, torch.optim.AdamW(dense.parameters(), lr=1e-5, foreach=True))}
    for name, cage in (("STE (QuEST W4A4)", dict(cage_lambda=0.0)), ("CAGE (QuEST W4A4, active)", {})):
        quantized = quantize_model(model(), QuantConfig())
        schedule = dict(cage_lambda=10.0, cage_silence_ratio=0.0, cage_schedule="constant", total_steps=10**9)
        variants[name] = (quantized, create_cage_optimizer(quantized, lr=1e-5, **{**schedule, **cage}))
    return variants


def run_train_step(dry_run: bool, steps: int | None) -> dict:
    """Median seconds per step (forward, backward, optimizer) of each variant, bf16 autocast on CUDA."""
    import statistics

    import torch

    device = "cpu" if dry_run else "cuda"
    shape, batch, seq = (CPU_MODEL, 2, 32) if dry_run else (GPU_MODEL, 4, 1024)
    steps = steps or (2 if dry_run else 10)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    for name, (model, optimizer) in _step_variants(shape, device).items():

        def step(model=model, optimizer=optimizer):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        for _ in range(1 if dry_run else 3):  # warm-up: autotuning and compilation happen here
            step()
        times = []
        for _ in range(steps):
            sync()
            start = time.perf_counter()
            loss = step()
            sync()
            times.append(time.perf_counter() - start)
        results[name] = {"s_per_step": statistics.median(times), "loss": float(loss.detach())}
        del model, optimizer
        if device == "cuda":
            torch.cuda.empty_cache()
    ok = all(v["loss"] == v["loss"] for v in results.values())  # no NaN
    return {"ok": ok, "shape": shape, "tokens": batch * seq, "steps": steps, "variants": results}


def _row(rows: list[dict], m: int, kernel: str) -> dict | None:
    return next((r for r in rows if r["M"] == m and r["kernel"].startswith(kernel)), None)


def format_report(stages: dict, dry_run: bool, elapsed: dict) -> str:
    kern, train, tests = stages.get("kernels"), stages.get("train_step"), stages.get("pytest")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = []
    if dry_run:
        lines += [
            "**Dry run on CPU (`python scripts/gpu_check.py --dry-run`): wiring only, NOT A MEASUREMENT.** The "
            "numbers below are CPU timings of the torch twins on tiny shapes.",
            "",
        ]
    lines.append(f"`make gpu-check`, {when}; stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in elapsed.items()))
    if tests:
        lines += ["", f"`pytest -m gpu`: {tests['summary']}" + ("" if tests["ok"] else " (FAILED)")]
    if kern:
        lines += ["", f"Kernels on {kern['device']} (hf-cage backend {kern['backend']}, torch {kern['torch']}); "
                  "time in microseconds, speedup = bf16 `torch.matmul` time / kernel time:", ""]  # fmt: skip
        lines += [
            "| M | K | N | bf16 matmul | `torch._int_mm` int8 | W4A4 | quantizer (act) | W4A16 | W4A4 x | "
            "W4A4+quantizer x | W4A16 x | checks |",
            "|" + "---|" * 12,
        ]
        rows = kern["rows"]
        for m in sorted({r["M"] for r in rows}):
            for k, n in sorted({(r["K"], r["N"]) for r in rows if r["M"] == m}):
                sel = [r for r in rows if (r["M"], r["K"], r["N"]) == (m, k, n)]
                get = {name: next((r for r in sel if r["kernel"].startswith(name)), None) for name in
                       ("torch.matmul", "torch._int_mm", "w4a4", "quantize_rows", "w4a16")}  # fmt: skip
                bf16 = get["torch.matmul"]["us"]

                def us(name, get=get):
                    return f"{get[name]['us']:.1f}" if get[name] else "n/a"

                w4a4, quant, w4a16 = (get[n_]["us"] for n_ in ("w4a4", "quantize_rows", "w4a16"))
                ok = all(r.get("ok", True) for r in sel)
                lines.append(
                    f"| {m} | {k} | {n} | {bf16:.1f} | {us('torch._int_mm')} | {w4a4:.1f} | {quant:.1f} | "
                    f"{w4a16:.1f} | {bf16 / w4a4:.2f} | {bf16 / (w4a4 + quant):.2f} | {bf16 / w4a16:.2f} | "
                    f"{'ok' if ok else 'FAILED'} |"
                )
        if not dry_run:
            lines += ["", _targets(rows)]
    if train:
        base = train["variants"]["BF16"]["s_per_step"]
        lines += [
            "",
            f"Training step (forward + backward + optimizer, bf16 autocast on CUDA, {train['tokens']} tokens, Llama "
            f"hidden {train['shape']['hidden_size']} x {train['shape']['num_hidden_layers']} layers, median of "
            f"{train['steps']} steps):",
            "",
            "| variant | ms / step | vs BF16 |",
            "|---|---|---|",
        ]
        for name, v in train["variants"].items():
            lines.append(f"| {name} | {v['s_per_step'] * 1e3:.1f} | {v['s_per_step'] / base:.2f} |")
    return "\n".join(lines)


def _targets(rows: list[dict]) -> str:
    def speedup(m, kernel):
        base, row = _row(rows, m, "torch.matmul"), _row(rows, m, kernel)
        return base["us"] / row["us"] if base and row else float("nan")

    w4a16 = speedup(1, "w4a16")
    w4a4 = min(speedup(m, "w4a4") for m in KERNEL_M if m >= 2048)
    return (
        f"Targets: W4A16 >= {TARGETS['w4a16_m1']}x bf16 at M = 1: {w4a16:.2f}x "
        f"({'met' if w4a16 >= TARGETS['w4a16_m1'] else 'NOT met'}); W4A4 >= {TARGETS['w4a4_large_m']}x bf16 at "
        f"M >= 2048 (GEMM alone): {w4a4:.2f}x ({'met' if w4a4 >= TARGETS['w4a4_large_m'] else 'NOT met'})."
    )


def write_section(path: Path, body: str) -> None:
    """Replace what lies between the gpu-check markers of ``path`` with ``body``, atomically."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no {BEGIN} ... {END} section to write into")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{body}\n{END}{tail}"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device; run with --dry-run to check the wiring on CPU", file=sys.stderr)
        return 2
    if args.dry_run:
        os.environ.setdefault("HF_CAGE_BACKEND", "torch")
    docs = Path(args.docs) if args.docs else DOCS
    stages, elapsed, start = {}, {}, time.perf_counter()
    for name, run in (
        ("pytest", lambda: run_pytest(args.dry_run)),
        ("kernels", lambda: run_kernel_benchmark(args.dry_run)),
        ("train_step", lambda: run_train_step(args.dry_run, args.steps)),
    ):
        t0 = time.perf_counter()
        print(f"== gpu-check: {name}", flush=True)
        try:
            stages[name] = run()
        except Exception as err:  # a stage that crashes is reported, the others still run
            print(f"gpu-check: {name} failed: {type(err).__name__}: {err}", file=sys.stderr)
            stages[name] = None
        elapsed[name] = time.perf_counter() - t0
    report = format_report({k: v for k, v in stages.items() if v}, args.dry_run, elapsed)
    write_section(docs, report)
    print(report)
    total = time.perf_counter() - start
    failed = [name for name, result in stages.items() if not result or not result["ok"]]
    print(f"gpu-check: {total:.0f} s in all; wrote {docs}; " + (f"FAILED: {failed}" if failed else "all stages ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed and correctness of hf-cage's int4 kernels against torch's bf16 and int8 GEMMs.

On a GPU (CUDA tensors dispatch to the Triton kernels):

    python benchmarks/kernels.py                          # Llama shapes, M = 1 .. 8192, table to stdout
    python benchmarks/kernels.py --output docs/kernels_h100.md --m 1 16 128 1024 8192 --kn 4096,4096 4096,11008
    python benchmarks/kernels.py --m 1 16 2048 8192 --kn 4096,4096 --json out.json   # what `make gpu-check` runs

Without a GPU (shapes and correctness only, no timings worth reading):

    python benchmarks/kernels.py --dry-run                                            # torch twins
    TRITON_INTERPRET=1 HF_CAGE_BACKEND=triton python benchmarks/kernels.py --dry-run  # Triton, interpreted

Every row times one op on ``x (M, K)`` and a ``(N, K)`` weight: ``torch.matmul`` in bf16, ``torch._int_mm``
(int8, CUDA only), the W4A4 GEMM on packed int4 weights (per-channel scales, mid-rise offsets), the
W4A16 GEMM (bf16 activations, group-128 scales), and the fused activation quantizer (per-token,
Hadamard 128) that feeds W4A4. Each kernel row also checks a slice of its output on CPU against an
oracle written here, independent of hf-cage's twins (``max_rel_err``, ``ok``): the GEMMs against
dequantize-then-matmul in fp64, the quantizer's scales against ``alpha_b * RMS`` of the rotated rows
(explicit Hadamard matrix) and its codes against rounding with those scales.
"""

from __future__ import annotations

import argparse
import sys
import time

LLAMA_DIMS = (2048, 4096, 8192, 11008)
DEFAULT_M = (1, 16, 64, 256, 1024, 4096, 8192)
DRY_RUN_KN = ((128, 256), (256, 96))
DRY_RUN_M = (1, 33)
CHECK_ROWS, CHECK_COLS = 16, 256


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark hf-cage's int4 kernels vs torch bf16 matmul and torch._int_mm.",
        epilog="example: python benchmarks/kernels.py --m 1 1024 --kn 4096,4096",
    )
    parser.add_argument("--dry-run", action="store_true", help="small shapes on CPU, correctness only")
    parser.add_argument("--m", type=int, nargs="+", default=None, help="token counts M (default 1..8192)")
    parser.add_argument(
        "--kn", nargs="+", default=None, help="K,N pairs (default: every pair from 2048, 4096, 8192, 11008)"
    )
    parser.add_argument("--output", default=None, help="also write the markdown table to this file")
    parser.add_argument("--json", default=None, help="also write the rows (and the device) to this JSON file")
    return parser.parse_args(argv)


def _timer(device: str):
    """``bench(fn) -> seconds``: triton's do_bench on CUDA, one wall-clock call on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=50) * 1e-3

    def once(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return once


def _rel_err(out, expected) -> float:
    out, expected = out.float().cpu(), expected.float().cpu()
    return float((out - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def _hadamard(block: int):
    """Normalized Sylvester Hadamard matrix, fp64, built here (not hf-cage's)."""
    import torch

    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / block**0.5


def _oracle_matmul(x_codes, x_scales, w_codes, w_scales, x_offset: float, w_offset: float):
    """``((Xc + a) s_x) @ ((Wc + b) s_w).T`` in fp64 on CPU: dequantize, then one matmul."""
    n, k = w_codes.shape
    ws = w_scales.double().cpu().reshape(n, -1)
    w = ((w_codes.double().cpu() + w_offset).reshape(n, ws.shape[1], -1) * ws.unsqueeze(-1)).reshape(n, k)
    return ((x_codes.double().cpu() + x_offset) * x_scales.double().cpu().reshape(-1, 1)) @ w.T


def _oracle_weights(w_codes, w_scales):
    """Integer-grid weights ``Wc * s_w`` (per channel or group) in fp64 on CPU."""
    n, k = w_codes.shape
    ws = w_scales.double().cpu().reshape(n, -1)
    return (w_codes.double().cpu().reshape(n, ws.shape[1], -1) * ws.unsqueeze(-1)).reshape(n, k)


def _quantizer_error(x, codes, scales, spec) -> float:
    """Largest of: relative scale error against ``alpha_b RMS(x H) / (2^b - 1) * 2`` and the fraction of codes
    that differ from the mid-rise rounding of ``x H`` with the kernel's own scales (ties may flip one code)."""
    import torch

    from hf_cage.kernels.spec import GAUSSIAN_MSE_CLIP

    xr = x.double().cpu()
    if spec.hadamard_block:
        b = spec.hadamard_block
        xr = (xr.reshape(xr.shape[0], -1, b) @ _hadamard(b)).reshape(xr.shape)
    step = 2 * GAUSSIAN_MSE_CLIP[spec.bits] * xr.square().mean(-1, keepdim=True).sqrt() / (2**spec.bits - 1)
    scales = scales.double().cpu().reshape(-1, 1)
    clip = scales * (2**spec.bits - 1) / 2
    expected = torch.round(torch.clamp(xr, -clip, clip) / scales + 0.5) - 1
    scale_err = float(((scales - step).abs() / step).max())
    return max(scale_err, float((codes.cpu().double() != expected).double().mean()))


def bench_shape(m: int, k: int, n: int, device: str, bench) -> list[dict]:
    import torch

    from hf_cage import kernels
    from hf_cage.kernels import QuantSpec

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device)
    w = torch.randn(n, k, generator=gen).to(device) * 0.02
    flops = 2.0 * m * n * k
    rows = []

    def add(name, seconds, err=None, tol=None, bytes_moved=None):
        row = dict(M=m, K=k, N=n, kernel=name, us=seconds * 1e6, tflops=flops / seconds / 1e12)
        if bytes_moved is not None:
            row["tflops"] = None
            row["gbps"] = bytes_moved / seconds / 1e9
        if err is not None:
            row["max_rel_err"], row["ok"] = err, err <= tol
        rows.append(row)

    xb, wb = x.bfloat16(), w.bfloat16()
    add("torch.matmul bf16", bench(lambda: xb @ wb.T))
    if device == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0:
        xi = torch.randint(-8, 8, (m, k), device=device, dtype=torch.int8)
        wi = torch.randint(-8, 8, (k, n), device=device, dtype=torch.int8)
        add("torch._int_mm int8", bench(lambda: torch._int_mm(xi, wi)))

    a_spec = QuantSpec(4, hadamard_block=128 if k % 128 == 0 else None)
    w_spec = QuantSpec(4, hadamard_block=a_spec.hadamard_block)
    x_codes, x_scales = kernels.quantize_rows(x, a_spec)
    rs, cs = slice(0, CHECK_ROWS), slice(0, CHECK_COLS)
    err = _quantizer_error(x[rs], x_codes[rs], x_scales[rs], a_spec)
    add("quantize_rows act (fused)", bench(lambda: kernels.quantize_rows(x, a_spec)), err, 1e-3, m * k * 5)

    w_codes, w_scales = kernels.quantize_rows(w, w_spec)
    w_packed = kernels.pack_int4(w_codes)

    def w4a4():
        return kernels.w4a4_matmul(
            x_codes, x_scales, w_packed, w_scales, x_offset=0.5, w_offset=0.5, out_dtype=torch.bfloat16
        )

    ref = _oracle_matmul(x_codes[rs], x_scales[rs], w_codes[cs], w_scales[cs], 0.5, 0.5)
    add("w4a4_matmul (int4 x int4)", bench(w4a4), _rel_err(w4a4()[rs, cs], ref), 2**-7)

    group = 128 if k % 128 == 0 else None
    g_codes, g_scales = kernels.quantize_rows(w, QuantSpec(4, "integer", "absmax", group))
    g_packed = kernels.pack_int4(g_codes)

    def w4a16():
        return kernels.w4a16_matmul(xb, g_packed, g_scales)

    ref = x[rs].cpu().bfloat16().double() @ _oracle_weights(g_codes[cs], g_scales[cs]).T
    add("w4a16_matmul (bf16 x int4)", bench(w4a16), _rel_err(w4a16()[rs, cs], ref), 2**-6)
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| M | K | N | kernel | time (us) | TFLOP/s | GB/s | max rel err | ok |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        tflops = f"{r['tflops']:.1f}" if r.get("tflops") is not None else ""
        gbps = f"{r['gbps']:.0f}" if "gbps" in r else ""
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else ""
        ok = {True: "yes", False: "NO"}.get(r.get("ok"), "")
        lines.append(
            f"| {r['M']} | {r['K']} | {r['N']} | {r['kernel']} | {r['us']:.1f} | {tflops} | {gbps} | {err} | {ok} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from hf_cage.kernels import backend_for

    if args.dry_run:
        device, kn, ms = "cpu", DRY_RUN_KN, DRY_RUN_M
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run for a CPU correctness pass", file=sys.stderr)
            return 2
        device = "cuda"
        kn = [tuple(int(v) for v in p.split(",")) for p in args.kn] if args.kn else None
        kn = kn or [(k, n) for k in LLAMA_DIMS for n in LLAMA_DIMS]
        ms = args.m or DEFAULT_M
    backend = backend_for(torch.empty(0, device=device))
    bench = _timer(device)
    rows = [row for k, n in kn for m in ms for row in bench_shape(m, k, n, device, bench)]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    table = f"device: {name}; hf-cage backend: {backend}; torch {torch.__version__}\n\n" + format_table(rows)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"device": name, "backend": backend, "torch": torch.__version__, "rows": rows}, f, indent=1)
    failed = [r for r in rows if r.get("ok") is False]
    if failed:
        print(f"{len(failed)} rows failed the correctness check", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

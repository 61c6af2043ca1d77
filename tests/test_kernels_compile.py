"""Compile every Triton kernel for an H100 (sm_90) without a GPU: tile legality and shared memory.

The interpreter does not check what a GPU compile does (``tl.dot`` shapes, layouts, shared memory),
so each kernel configuration the launchers can pick is compiled ahead of time here with Triton's own
compiler and checked against H100's 227 KiB of shared memory per block.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, stated (silences a warning)

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("ahead-of-time compilation needs the compiled (non-interpreted) kernels", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hf_cage.kernels import triton_matmul, triton_quant  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 227 * 1024

W4A4_SIGNATURE = dict(
    a_ptr="*i8", a_scale_ptr="*fp32", b_ptr="*i32", b_scale_ptr="*fp32", c_ptr="*bf16",
    M="i32", N="i32", K="i32", stride_am="i32", stride_bn="i32", stride_cm="i32", n_groups="i32",
)  # fmt: skip
W4A16_SIGNATURE = dict(
    x_ptr="*bf16", b_ptr="*i32", b_scale_ptr="*fp32", c_ptr="*bf16", M="i32", N="i32", K="i32",
    stride_xm="i32", stride_bn="i32", stride_cm="i32", n_groups="i32", group_len="i32", w_offset="fp32",
)  # fmt: skip
QUANT_SIGNATURE = dict(
    x_ptr="*bf16", had_ptr="*fp32", codes_ptr="*i8", scales_ptr="*fp32", q_ptr="*bf16", mask_ptr="*i8",
    M="i32", segment="i32", stride_xm="i32", n_scales="i32",
    alpha="fp32", step_divisor="fp32", qmin="fp32", qmax="fp32", tiny="fp32", zero_step="fp32",
)  # fmt: skip


def compile_for_h100(fn, signature: dict, constexprs: dict, **options):
    full = dict(signature, **{name: "constexpr" for name in constexprs})
    return triton.compile(ASTSource(fn=fn, signature=full, constexprs=constexprs), target=H100, options=options)


def tile_configs(int8: bool):
    """The launcher's smallest and largest tiles and a narrow one (each compile takes about a second)."""
    return {triton_matmul._tiles(m, n, 4096, int8) for m, n in ((1, 4096), (4096, 4096), (65, 64))}


@pytest.mark.parametrize(
    "config, group",
    [(c, 0) for c in sorted(tile_configs(int8=True))] + [((128, 128, 32, 8), 32), ((16, 128, 128, 4), 128)],
    ids=str,
)
def test_w4a4_compiles_for_h100(config, group):
    block_m, block_n, block_k, warps = config
    constexprs = dict(
        A_DOUBLE=True, B_DOUBLE=True, GROUPED=bool(group), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=group or block_k
    )
    kernel = compile_for_h100(triton_matmul._w4a4_matmul_kernel, W4A4_SIGNATURE, constexprs, num_warps=warps)
    assert kernel.metadata.shared <= H100_SHARED_BYTES


@pytest.mark.parametrize(
    "config, dot_fp32", [(c, False) for c in sorted(tile_configs(int8=False))] + [((64, 128, 64, 4), True)], ids=str
)
def test_w4a16_compiles_for_h100(config, dot_fp32):
    block_m, block_n, block_k, warps = config
    signature = dict(W4A16_SIGNATURE, **({"x_ptr": "*fp32", "c_ptr": "*fp32"} if dot_fp32 else {}))
    constexprs = dict(DOT_FP32=dot_fp32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    kernel = compile_for_h100(triton_matmul._w4a16_matmul_kernel, signature, constexprs, num_warps=warps)
    assert kernel.metadata.shared <= H100_SHARED_BYTES


@pytest.mark.parametrize(
    "k, spec",
    [
        (4096, triton_quant.QuantSpec(4, hadamard_block=128)),
        (11008, triton_quant.QuantSpec(4, hadamard_block=128)),
        (4096, triton_quant.QuantSpec(4, group_size=32, hadamard_block=128)),
        (4096, triton_quant.QuantSpec(4, "integer", "absmax", group_size=128)),
        (11008, triton_quant.QuantSpec(8)),
        (4096, triton_quant.QuantSpec(4, "integer", "minmax")),
    ],
    ids=str,
)
def test_quantizer_compiles_for_h100(k, spec):
    segment, chunk, groups_per_chunk, group = triton_quant._layout(k, spec)
    constexprs = dict(
        CHUNK=chunk, GROUPS_PER_CHUNK=groups_per_chunk, GROUP_LEN=group, BLOCK_M=16,
        HADAMARD=bool(spec.hadamard_block), MIDRISE=spec.grid == "midrise", MSE=spec.scale_rule == "mse",
        STORE_CODES=True, STORE_Q=True,
    )  # fmt: skip
    stages = 1 if spec.hadamard_block else 3  # as the launcher sets it
    kernel = compile_for_h100(
        triton_quant._quantize_kernel, QUANT_SIGNATURE, constexprs, num_stages=stages, enable_fp_fusion=False
    )
    assert kernel.metadata.shared <= H100_SHARED_BYTES

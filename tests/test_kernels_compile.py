"""Compile every Triton kernel config for sm_80, sm_89 and sm_90 without a GPU: tile legality, shared memory.

The interpreter does not check what a GPU compile does (``tl.dot`` shapes, layouts, shared memory), so every
config the autotuner may try (:data:`hf_cage.kernels.tiles.GEMM_SPACE`) and the quantizer layouts of Llama
sizes are lowered here with Triton's own compiler, through its LLVM-IR stage, where shared memory is
allocated (the PTX assembler, which adds nothing to these checks and triples the time, is skipped; one
config per kernel goes all the way to a cubin). Checked, per arch: the tile pruner's shared-memory bound
holds, every config the pruner keeps fits the arch's shared memory, and the row offsets are 64-bit.
"""

from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, stated (silences a warning)

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("ahead-of-time compilation needs the compiled (non-interpreted) kernels", allow_module_level=True)

from triton._C.libtriton import ir, nvidia, passes  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptx_version_from_options  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402

from hf_cage.kernels import QuantSpec, tiles, triton_matmul, triton_quant  # noqa: E402

ARCHS = (80, 89, 90)

W4A4_SIGNATURE = dict(
    a_ptr="*i8", a_scale_ptr="*fp32", b_ptr="*i32", b_scale_ptr="*fp32", c_ptr="*bf16",
    M="i32", N="i32", K="i32", stride_am="i32", stride_bn="i32", stride_cm="i32", n_groups="i32",
    group_len="i32", m_bucket="i32",
)  # fmt: skip
W4A16_SIGNATURE = dict(
    x_ptr="*bf16", b_ptr="*i32", b_scale_ptr="*fp32", c_ptr="*bf16", M="i32", N="i32", K="i32",
    stride_xm="i32", stride_bn="i32", stride_cm="i32", n_groups="i32", group_len="i32", m_bucket="i32",
    w_offset="fp32",
)  # fmt: skip
QUANT_SIGNATURE = dict(
    x_ptr="*bf16", had_ptr="*fp32", codes_ptr="*i8", scales_ptr="*fp32", q_ptr="*bf16", mask_ptr="*i8",
    M="i32", segment="i32", stride_xm="i32", k="i32", n_scales="i32",
    alpha="fp32", step_divisor="fp32", qmin="fp32", qmax="fp32", tiny="fp32", zero_step="fp32",
)  # fmt: skip


def lower(fn, signature: dict, constexprs: dict, arch: int, last: str = "ttgir", **options) -> tuple[int, str]:
    """Run Triton's NVIDIA pipeline for ``arch`` up to stage ``last``: ``(shared memory bytes, TTIR text)``.

    The same stages ``triton.compile`` runs, stopped early (``triton.compile`` has no such switch).
    """
    target = GPUTarget("cuda", arch, 32)
    src = ASTSource(fn=fn, signature=dict(signature, **{n: "constexpr" for n in constexprs}), constexprs=constexprs)
    backend = make_backend(target)
    opts = backend.parse_options(dict(options, **src.parse_options()))
    stages: dict = {}
    backend.add_stages(stages, opts, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context)
    metadata = {"target": target, **opts.__dict__}
    ttir = ""
    for ext, stage in stages.items():
        module = stage(module, metadata)
        if ext == "ttir":
            ttir = str(module)
        if ext == last:
            break
    if last == "ttgir":
        # The head of the LLVM-IR stage (make_llir) up to shared-memory allocation; the LLVM lowering and
        # optimization after it take 5-10 times longer and change no allocation.
        pm = ir.pass_manager(module.context)
        passes.ttgpuir.add_combine_tensor_select_and_if(pm)
        passes.ttgpuir.add_allocate_warp_groups(pm, False)
        passes.convert.add_scf_to_cf(pm)
        passes.gluon.add_inliner(pm)
        nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, arch, get_ptx_version_from_options(opts, arch))
        pm.run(module, "allocate_shared_memory")
        return module.get_int_attr("ttg.shared"), ttir
    return metadata.get("shared", 0), ttir


def row_offsets_are_64_bit(ttir: str, tile_rows: int) -> bool:
    """True when every ``rows[:, None] * stride`` product of a ``tile_rows``-row tile is i64 in the TTIR (the
    products that pass 2^31 for large M x K); offsets inside a row (< K) may stay 32-bit."""
    products = re.findall(rf"arith\.muli .*: tensor<{tile_rows}x1x(i\d+)>", ttir)
    return bool(products) and all(t == "i64" for t in products)


def gemm_cases():
    for arch in ARCHS:
        for tile in tiles.GEMM_SPACE:
            yield pytest.param(
                arch, tile, id=f"sm{arch}-{tile.block_m}x{tile.block_n}x{tile.block_k}-s{tile.num_stages}"
            )


def check_tile(kind: str, arch: int, tile: tiles.GemmTile, group_len: int | None, a_bytes: int, shared: int) -> None:
    limit = tiles.SHARED_MEMORY_BYTES[arch]
    bound = tiles.gemm_shared_bytes(kind, tile, a_bytes)
    assert shared <= bound, f"pruner bound {bound} under the {shared} bytes Triton allocates"
    if tiles.tile_problem(kind, tile, 4096, group_len, limit, a_bytes) is None:
        assert shared <= limit


@pytest.mark.parametrize("arch, tile", gemm_cases())
def test_w4a4_every_config(arch, tile):
    grouped = tile.block_k == tiles.INT8_DOT_K  # 32-wide K tiles serve group-32 scales only
    constexprs = dict(
        A_DOUBLE=True, B_DOUBLE=True, GROUPED=grouped, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k
    )
    shared, ttir = lower(
        triton_matmul._w4a4_matmul_kernel, W4A4_SIGNATURE, constexprs, arch,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    check_tile("w4a4", arch, tile, 32 if grouped else None, 1, shared)
    assert row_offsets_are_64_bit(ttir, tile.block_m)


@pytest.mark.parametrize("arch, tile", gemm_cases())
def test_w4a16_every_config(arch, tile):
    constexprs = dict(DOT_FP32=False, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k)
    shared, ttir = lower(
        triton_matmul._w4a16_matmul_kernel, W4A16_SIGNATURE, constexprs, arch,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    check_tile("w4a16", arch, tile, None, 2, shared)
    assert row_offsets_are_64_bit(ttir, tile.block_m)


@pytest.mark.parametrize("arch", ARCHS)
def test_w4a16_fp32_inputs(arch):
    limit = tiles.SHARED_MEMORY_BYTES[arch]
    for tile in tiles.gemm_configs("w4a16", 2048, 4096, 4096, None, limit, 4)[:1]:
        signature = dict(W4A16_SIGNATURE, x_ptr="*fp32", c_ptr="*fp32")
        constexprs = dict(DOT_FP32=True, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k)
        shared, _ = lower(
            triton_matmul._w4a16_matmul_kernel, signature, constexprs, arch,
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )  # fmt: skip
        check_tile("w4a16", arch, tile, None, 4, shared)


def test_the_known_illegal_tile_really_is_over_h100_shared_memory():
    """The tile tests/test_kernels_tiles.py expects the pruner to reject, compiled: it does not fit an H100."""
    from test_kernels_tiles import KNOWN_ILLEGAL_TILE as tile

    signature = dict(W4A16_SIGNATURE, x_ptr="*fp32", c_ptr="*fp32")
    constexprs = dict(DOT_FP32=True, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k)
    shared, _ = lower(
        triton_matmul._w4a16_matmul_kernel, signature, constexprs, 90,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    assert shared > tiles.SHARED_MEMORY_BYTES[90]
    assert tiles.tile_problem("w4a16", tile, 4096, None, tiles.SHARED_MEMORY_BYTES[90], 4) is not None


QUANT_CASES = [
    (4096, QuantSpec(4, hadamard_block=128)),
    (11008, QuantSpec(4, hadamard_block=128)),
    (4096, QuantSpec(4, group_size=32, hadamard_block=128)),
    (4096, QuantSpec(4, "int", "absmax", group_size=128)),
    (11008, QuantSpec(8)),
    (4096, QuantSpec(4, "int", "minmax")),
    (200, QuantSpec(4, "int", "minmax")),  # an 8-wide chunk, no rotation: legal
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k, spec", QUANT_CASES, ids=str)
def test_quantizer_layouts(arch, k, spec):
    layout = tiles.quant_layout(k, spec)
    constexprs = dict(
        CHUNK=layout.chunk, GROUPS_PER_CHUNK=layout.groups_per_chunk, GROUP_LEN=layout.group,
        BLOCK_M=tiles.QUANT_BLOCK_M, HADAMARD=bool(spec.hadamard_block), MIDRISE=bool(spec.code_offset),
        MSE=spec.scale_rule == "mse", STORE_CODES=True, STORE_Q=True,
    )  # fmt: skip
    shared, ttir = lower(
        triton_quant._quantize_kernel, QUANT_SIGNATURE, constexprs, arch,
        num_stages=layout.num_stages, enable_fp_fusion=False,
    )  # fmt: skip
    assert shared <= layout.shared_bytes(tiles.QUANT_BLOCK_M) <= tiles.SHARED_MEMORY_BYTES[arch]
    assert row_offsets_are_64_bit(ttir, tiles.QUANT_BLOCK_M)


def test_one_config_per_kernel_assembles_to_a_cubin_for_h100():
    """The full pipeline (PTX and ptxas) once per kernel, at the largest legal tile."""
    target = GPUTarget("cuda", 90, 32)
    legal = tiles.gemm_configs("w4a4", 8192, 4096, 4096, None, tiles.SHARED_MEMORY_BYTES[90], 1)
    tile = max(legal, key=lambda t: (t.block_m * t.block_n * t.block_k, t.num_stages))
    constexprs = dict(
        A_DOUBLE=True, B_DOUBLE=True, GROUPED=False, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k
    )
    signature = dict(W4A4_SIGNATURE, **{n: "constexpr" for n in constexprs})
    src = ASTSource(fn=triton_matmul._w4a4_matmul_kernel, signature=signature, constexprs=constexprs)
    kernel = triton.compile(src, target=target, options=dict(num_warps=tile.num_warps, num_stages=tile.num_stages))
    assert kernel.asm["cubin"] and kernel.metadata.shared <= tiles.SHARED_MEMORY_BYTES[90]

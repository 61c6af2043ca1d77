"""Triton kernels: GEMMs on packed int4 weights (W4A4 for QAT and packed inference, W4A16 for inference).

Weights arrive packed in the compressed-tensors layout (:mod:`hf_cage.kernels.packing`): ``w_packed`` int32
``(N, K / 8)``, code ``k`` of row ``n`` stored as ``code + 8`` in bits ``4 (k % 8) .. 4 (k % 8) + 3`` of word
``k // 8``. Each kernel loads every word of its tile once and unpacks it in registers.

- :func:`w4a4_matmul`: the codes go through an int8 ``tl.dot`` with an int32 accumulator, which is exact; a
  mid-rise grid feeds ``2 code + 1`` and scales the integer by ``1/2`` per doubled side. Epilogue
  ``(acc * s_x) * s_w``, the operation order of :func:`hf_cage.kernels.reference.int_matmul_reference`, so given
  the same codes and scales the output is bit-identical to it. Per-group weight scales: a K tile is one group.
- :func:`w4a16_matmul`: fp16/bf16/fp32 activations; weights dequantized in registers to ``(code + offset) * scale``
  and fed to ``tl.dot`` in the activation dtype with an fp32 accumulator (IEEE fp32 dots for fp32 inputs, no
  TF32; fp32 dots under the interpreter, whose bf16 arithmetic is wrong).

On CUDA both are autotuned over the legal tiles :func:`hf_cage.kernels.tiles.gemm_configs` keeps for the problem;
under the interpreter one fixed legal tile is used. Row and column indices are 64-bit. Why the kernels are built
this way: docs/kernels.md, "Design".
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import tiles
from .triton_common import check_device, interpreting

_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _unpack_tile(b_ptr, rn, k0, n_ok, K, stride_bn, BLOCK_K: tl.constexpr):
    """Codes ``(BLOCK_K, BLOCK_N)`` int32 in ``[-8, 7]`` of packed rows ``rn`` at inputs ``k0 .. k0 + BLOCK_K``.

    Each word is loaded once (a ``(BLOCK_K / 8, BLOCK_N)`` tile) and spread over its 8 codes in registers:
    ``[w, j, n] = (word[w, n] >> 4 j) & 0xF``, reshaped row-major so that input ``k = 8 w + j``.
    """
    kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    words = tl.load(
        b_ptr + rn[None, :] * stride_bn + kw[:, None], mask=(kw < K // 8)[:, None] & n_ok[None, :], other=0
    )
    shifts = tl.arange(0, 8) * 4
    nibbles = (words[:, None, :] >> shifts[None, :, None]) & 0xF
    return tl.reshape(nibbles, (BLOCK_K, words.shape[1])) - 8


@triton.jit
def _output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(rm, rn, m_ok, n_ok)``: the rows and columns of this program's ``(BLOCK_M, BLOCK_N)`` output tile and which
    of them lie inside ``(M, N)``. 64-bit: ``rows * stride`` passes 2^31 once M x K does (8 x 32k tokens x 8192)."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn, rm < M, rn < N


@triton.jit
def _load_activation_tile(a_ptr, rm, m_ok, k0, K, stride_am, BLOCK_K: tl.constexpr):
    """``(tile, k_ok)``: rows ``rm`` of the row-major activations at inputs ``k0 .. k0 + BLOCK_K`` (zero outside
    ``(M, K)``), and which of those inputs lie inside ``K``."""
    kk = k0 + tl.arange(0, BLOCK_K)
    k_ok = kk < K
    tile = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
    return tile, k_ok


@triton.jit
def _store_output_tile(c_ptr, rm, rn, m_ok, n_ok, stride_cm, out):
    """Write the fp32 tile ``out`` at rows ``rm``, columns ``rn`` of the row-major output, in its dtype."""
    tl.store(
        c_ptr + rm[:, None] * stride_cm + rn[None, :],
        out.to(c_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _w4a4_matmul_kernel(
    a_ptr,
    a_scale_ptr,
    b_ptr,
    b_scale_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cm,
    n_groups,
    group_len,
    m_bucket,
    A_DOUBLE: tl.constexpr,
    B_DOUBLE: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm, rn, m_ok, n_ok = _output_tile(M, N, BLOCK_M, BLOCK_N)
    inv = 1.0 / ((1 + A_DOUBLE) * (1 + B_DOUBLE))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a, k_ok = _load_activation_tile(a_ptr, rm, m_ok, k0, K, stride_am, BLOCK_K)
        a = a.to(tl.int32)
        if A_DOUBLE:
            a = tl.where(k_ok[None, :], 2 * a + 1, 0)
        w = _unpack_tile(b_ptr, rn, k0, n_ok, K, stride_bn, BLOCK_K)
        if B_DOUBLE:
            w = tl.where(k_ok[:, None], 2 * w + 1, 0)
        dot = tl.dot(a.to(tl.int8), w.to(tl.int8), out_dtype=tl.int32)
        if GROUPED:
            w_scale = tl.load(b_scale_ptr + rn * n_groups + k0 // group_len, mask=n_ok, other=0.0)
            acc_f += (dot.to(tl.float32) * inv) * w_scale[None, :]
        else:
            acc += dot
    a_scale = tl.load(a_scale_ptr + rm, mask=m_ok, other=0.0)
    if GROUPED:
        out = acc_f * a_scale[:, None]
    else:
        w_scale = tl.load(b_scale_ptr + rn, mask=n_ok, other=0.0)
        out = ((acc.to(tl.float32) * inv) * a_scale[:, None]) * w_scale[None, :]
    _store_output_tile(c_ptr, rm, rn, m_ok, n_ok, stride_cm, out)


@triton.jit
def _w4a16_matmul_kernel(
    x_ptr,
    b_ptr,
    b_scale_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_bn,
    stride_cm,
    n_groups,
    group_len,
    m_bucket,
    w_offset,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm, rn, m_ok, n_ok = _output_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, _ = _load_activation_tile(x_ptr, rm, m_ok, k0, K, stride_xm, BLOCK_K)
        codes = _unpack_tile(b_ptr, rn, k0, n_ok, K, stride_bn, BLOCK_K)
        # The K tile lies inside one scale group (the tile rules make BLOCK_K divide the group).
        w_scale = tl.load(b_scale_ptr + rn * n_groups + k0 // group_len, mask=n_ok, other=0.0)
        w = (codes.to(tl.float32) + w_offset) * w_scale[None, :]
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    _store_output_tile(c_ptr, rm, rn, m_ok, n_ok, stride_cm, acc)


def _check_packed(w_packed: torch.Tensor, w_scales: torch.Tensor, k: int) -> tuple[int, int]:
    """``(n_groups, group_len)`` of packed weights for ``k`` inputs."""
    if w_packed.dtype != torch.int32 or w_packed.dim() != 2:
        raise TypeError(f"w_packed must be 2-D int32 (N, K / 8), got {w_packed.dtype} {tuple(w_packed.shape)}")
    if w_packed.shape[1] * 8 != k:
        raise ValueError(f"w_packed holds {w_packed.shape[1] * 8} inputs per row but the activations have K={k}")
    n = w_packed.shape[0]
    scales = w_scales.reshape(n, -1) if w_scales.numel() % max(n, 1) == 0 else None
    if w_scales.dtype != torch.float32 or scales is None or k % scales.shape[1]:
        raise ValueError(
            f"w_scales must be fp32 (N,) or (N, G) with G dividing K={k}, got {w_scales.dtype} {tuple(w_scales.shape)}"
        )
    return scales.shape[1], k // scales.shape[1]


def _configs(kind: str) -> list[triton.Config]:
    return [
        triton.Config(
            {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k},
            num_warps=t.num_warps,
            num_stages=t.num_stages,
        )
        for t in tiles.GEMM_SPACE
    ]


def _tile(config: triton.Config) -> tiles.GemmTile:
    kw = config.kwargs
    return tiles.GemmTile(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages)


@functools.lru_cache(maxsize=8)
def shared_memory_limit(device_index: int) -> int:
    """Shared memory a block may opt in to on this CUDA device, in bytes."""
    return torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin


def _pruner(kind: str, a_bytes_arg: str | None):
    """``early_config_prune`` for ``@triton.autotune``: keep :func:`hf_cage.kernels.tiles.gemm_configs`."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        a_bytes = args[a_bytes_arg].element_size() if a_bytes_arg else 1
        group_len = args["group_len"] if args["n_groups"] > 1 else None
        limit = shared_memory_limit(args["c_ptr"].device.index or 0)
        legal = set(tiles.gemm_configs(kind, args["M"], args["N"], args["K"], group_len, limit, a_bytes))
        return [c for c in configs if _tile(c) in legal]

    return prune


# On CUDA the launchers autotune over the legal tiles, once per (M bucket, N, K, groups, dtypes); under the
# interpreter (whose autotuner takes a single config) they call the plain kernel with one fixed tile.
_KEY = ["m_bucket", "N", "K", "n_groups"]
_w4a4_autotuned = triton.autotune(
    _configs("w4a4"), key=_KEY, prune_configs_by={"early_config_prune": _pruner("w4a4", None)}
)(_w4a4_matmul_kernel)
_w4a16_autotuned = triton.autotune(
    _configs("w4a16"), key=_KEY, prune_configs_by={"early_config_prune": _pruner("w4a16", "x_ptr")}
)(_w4a16_matmul_kernel)


def _launch(autotuned, kernel, kind: str, grid_mn: tuple[int, int], group_len: int | None, *args, **constexprs):
    m, n = grid_mn
    if interpreting():
        t = tiles.interpreter_tile(kind, group_len)
        grid = (triton.cdiv(m, t.block_m), triton.cdiv(n, t.block_n))
        tile = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k)
        kernel[grid](*args, **constexprs, **tile, num_warps=t.num_warps, num_stages=t.num_stages)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
        autotuned[grid](*args, **constexprs)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when each row is contiguous (the kernels take any row stride), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _offset_flag(name: str, offset: float) -> bool:
    if offset not in (0.0, 0.5):
        raise ValueError(
            f"{name}={offset} is not supported; the int4 GEMM takes grid offsets 0 (integer) or 0.5 (mid-rise)"
        )
    return offset == 0.5


def w4a4_matmul(
    x_codes: torch.Tensor,
    x_scales: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    *,
    x_offset: float = 0.0,
    w_offset: float = 0.0,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``((Xc + x_offset) * s_x) @ ((Wc + w_offset) * s_w).T`` on int4 codes.

    Args:
        x_codes: int8 ``(M, K)`` in ``[-8, 7]``; x_scales: fp32 ``(M,)`` or ``(M, 1)`` per token.
        w_packed: int32 ``(N, K / 8)``; w_scales: fp32 ``(N,)``/``(N, 1)`` per channel or ``(N, G)``
            per group (group = K / G, a multiple of 32).
        x_offset, w_offset: ``0`` (integer grid) or ``0.5`` (mid-rise grid).
    Returns ``(M, N)`` in ``out_dtype``.
    """
    if x_codes.dtype != torch.int8 or x_codes.dim() != 2:
        raise TypeError(f"x_codes must be 2-D int8 (M, K), got {x_codes.dtype} {tuple(x_codes.shape)}")
    m, k = x_codes.shape
    n = w_packed.shape[0]
    n_groups, group_len = _check_packed(w_packed, w_scales, k)
    if x_scales.dtype != torch.float32 or x_scales.numel() != m:
        raise ValueError(f"x_scales must be fp32 with one scale per row (M={m}), got {tuple(x_scales.shape)}")
    grouped = n_groups > 1
    if grouped and group_len % tiles.INT8_DOT_K:
        # A K tile lies inside one group, and an int8 tl.dot needs K tiles of a multiple of 32.
        raise ValueError(f"per-group weight scales need groups of a multiple of 32 inputs, got {group_len}")
    check_device(x_codes, x_scales, w_packed, w_scales)
    a_double, b_double = _offset_flag("x_offset", x_offset), _offset_flag("w_offset", w_offset)
    x_codes = _rows_contiguous(x_codes)
    out = torch.empty(m, n, dtype=out_dtype, device=x_codes.device)
    if m == 0 or n == 0:
        return out
    _launch(
        _w4a4_autotuned,
        _w4a4_matmul_kernel,
        "w4a4",
        (m, n),
        group_len if grouped else None,
        x_codes,
        x_scales.contiguous(),
        w_packed.contiguous(),
        w_scales.contiguous(),
        out,
        m,
        n,
        k,
        x_codes.stride(0),
        k // 8,
        out.stride(0),
        n_groups,
        group_len,
        tiles.m_bucket(m),
        A_DOUBLE=a_double,
        B_DOUBLE=b_double,
        GROUPED=grouped,
    )
    return out


def w4a16_matmul(
    x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, *, w_offset: float = 0.0
) -> torch.Tensor:
    """``x @ ((Wc + w_offset) * s_w).T`` with the weights dequantized in registers.

    Args:
        x: ``(M, K)`` fp16, bf16 or fp32.
        w_packed: int32 ``(N, K / 8)``; w_scales: fp32 ``(N,)``/``(N, 1)`` per channel or ``(N, G)`` per group.
        w_offset: ``0`` (integer grid) or ``0.5`` (mid-rise grid).
    Returns ``(M, N)`` in the dtype of ``x``.
    """
    if x.dtype not in _ACTIVATION_DTYPES or x.dim() != 2:
        raise TypeError(f"x must be 2-D {_ACTIVATION_DTYPES}, got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    n = w_packed.shape[0]
    n_groups, group_len = _check_packed(w_packed, w_scales, k)
    check_device(x, w_packed, w_scales)
    _offset_flag("w_offset", w_offset)
    x = _rows_contiguous(x)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    _launch(
        _w4a16_autotuned,
        _w4a16_matmul_kernel,
        "w4a16",
        (m, n),
        group_len if n_groups > 1 else None,
        x,
        w_packed.contiguous(),
        w_scales.contiguous(),
        out,
        m,
        n,
        k,
        x.stride(0),
        k // 8,
        out.stride(0),
        n_groups,
        group_len,
        tiles.m_bucket(m),
        float(w_offset),
        DOT_FP32=x.dtype == torch.float32 or interpreting(),
    )
    return out

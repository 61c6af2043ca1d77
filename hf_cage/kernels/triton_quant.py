"""Triton kernel: fused row quantization (rotate, scale, round) for activations and weights.

One kernel serves :func:`quantize_rows` (int8 codes + fp32 scales, what the int GEMM eats) and
:func:`fake_quantize` (``Q(x)`` + straight-through mask, what QAT trains through); the torch twins
are :func:`hf_cage.kernels.reference.quantize_rows` and :func:`~hf_cage.kernels.reference.fake_quantize`.

Layout. ``x`` is viewed as ``(M, K)`` and cut into *segments*, the smallest spans independent for both the
rotation and the scale (a group, a Hadamard block holding several groups, or the whole row for per-token
scales), one program per ``BLOCK_M`` rows x segment. Pass 1 over the segment rotates each ``CHUNK``-wide tile and
accumulates the group statistic; pass 2 rotates again, rounds, and writes codes and/or ``Q`` rotated back plus
the mask (docs/kernels.md, "Design").

Numerics follow the twin: fp32 throughout, IEEE division and square root (``div_rn``, ``sqrt_rn``), round half
to even, no FMA contraction. The group sums run in another order than torch's, so a scale may differ from the
twin's by an ulp and move a value on a rounding boundary by one code; the tests check codes against the twin's
rounding *of the kernel's own scales*.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles
from .spec import QuantSpec
from .triton_common import block_diagonal_hadamard, check_device, interpreting, round_half_even

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TINY = torch.finfo(torch.float32).tiny


@triton.jit
def _rotate(x, had_ptr, cols, CHUNK: tl.constexpr, HADAMARD: tl.constexpr):
    if HADAMARD:
        x = tl.dot(x, tl.load(had_ptr + cols[:, None] * CHUNK + cols[None, :]), input_precision="ieee")
    return x


@triton.jit
def _load_rotated(x_ptr, had_ptr, rows, row_ok, cols, col0, stride_xm, CHUNK: tl.constexpr, HADAMARD: tl.constexpr):
    x = tl.load(x_ptr + rows[:, None] * stride_xm + (col0 + cols)[None, :], mask=row_ok[:, None], other=0.0)
    return _rotate(x.to(tl.float32), had_ptr, cols, CHUNK, HADAMARD)


@triton.jit
def _quantize_kernel(
    x_ptr,
    had_ptr,
    codes_ptr,
    scales_ptr,
    q_ptr,
    mask_ptr,
    M,
    segment,
    stride_xm,
    k,
    n_scales,
    alpha,
    step_divisor,
    qmin,
    qmax,
    tiny,
    zero_step,
    CHUNK: tl.constexpr,
    GROUPS_PER_CHUNK: tl.constexpr,
    GROUP_LEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HADAMARD: tl.constexpr,
    MIDRISE: tl.constexpr,
    MSE: tl.constexpr,
    STORE_CODES: tl.constexpr,
    STORE_Q: tl.constexpr,
):
    seg = tl.program_id(1)
    # 64-bit rows: rows * stride_xm passes 2^31 once M x K does (8 sequences of 32k tokens x K = 8192).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, CHUNK)
    group_in_chunk = tl.arange(0, GROUPS_PER_CHUNK)
    seg_start = seg * segment

    # Pass 1: group statistic -> clip and step, (BLOCK_M, GROUPS_PER_CHUNK).
    stat = tl.zeros((BLOCK_M, GROUPS_PER_CHUNK), dtype=tl.float32)
    for c in range(0, segment, CHUNK):
        x = _load_rotated(x_ptr, had_ptr, rows, row_ok, cols, seg_start + c, stride_xm, CHUNK, HADAMARD)
        xg = tl.reshape(x, (BLOCK_M, GROUPS_PER_CHUNK, CHUNK // GROUPS_PER_CHUNK))
        if MSE:
            stat += tl.sum(xg * xg, axis=2)
        else:
            stat = tl.maximum(stat, tl.max(tl.abs(xg), axis=2))
    if MSE:
        clip = alpha * tl.sqrt_rn(tl.div_rn(stat, tl.full((BLOCK_M, GROUPS_PER_CHUNK), GROUP_LEN, tl.float32)))
    else:
        clip = stat
    step = tl.div_rn(clip, step_divisor)
    step = tl.where(step == 0.0, zero_step, tl.maximum(step, tiny))
    clip = tl.maximum(clip, tiny)
    scale_cols = seg * GROUPS_PER_CHUNK + group_in_chunk
    tl.store(scales_ptr + rows[:, None] * n_scales + scale_cols[None, :], step, mask=row_ok[:, None])

    # Pass 2: round, write codes and/or Q (rotated back) and the trust mask.
    step3 = step[:, :, None]
    clip3 = clip[:, :, None]
    for c in range(0, segment, CHUNK):
        x = _load_rotated(x_ptr, had_ptr, rows, row_ok, cols, seg_start + c, stride_xm, CHUNK, HADAMARD)
        xg = tl.reshape(x, (BLOCK_M, GROUPS_PER_CHUNK, CHUNK // GROUPS_PER_CHUNK))
        if MIDRISE:
            code = round_half_even(tl.div_rn(tl.minimum(tl.maximum(xg, -clip3), clip3), step3) + 0.5) - 1.0
            value = (code + 0.5) * step3
        else:
            code = round_half_even(tl.minimum(tl.maximum(tl.div_rn(xg, step3) + 0.0, qmin), qmax))
            value = code * step3
        offs = rows[:, None] * k + (seg_start + c + cols)[None, :]  # outputs are contiguous (M, K)
        if STORE_CODES:
            tl.store(codes_ptr + offs, tl.reshape(code, (BLOCK_M, CHUNK)).to(tl.int8), mask=row_ok[:, None])
        if STORE_Q:
            trusted = tl.abs(value - xg) <= step3 * 0.5
            tl.store(mask_ptr + offs, tl.reshape(trusted, (BLOCK_M, CHUNK)).to(tl.int8), mask=row_ok[:, None])
            q = tl.reshape(value, (BLOCK_M, CHUNK))
            q = _rotate(q, had_ptr, cols, CHUNK, HADAMARD)
            tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=row_ok[:, None])


def step_rule(spec: QuantSpec) -> tuple[float, float, float]:
    """``(divisor, min_step, zero_step)``: ``step = clip / divisor``, then ``zero_step`` where it is 0, else at
    least ``min_step`` (the twin's ``_clip_and_step``: fp32 ``tiny`` for ``mse``/``absmax``; compressed-tensors'
    ``eps`` for a zero ``minmax`` step, no floor otherwise)."""
    if spec.scale_rule == "minmax":
        return (2**spec.bits - 1) / 2.0, 0.0, torch.finfo(torch.float32).eps
    if not spec.code_offset and spec.scale_rule == "absmax":
        return float(spec.qmax), _TINY, _TINY
    return (2**spec.bits - 1) / 2.0, _TINY, _TINY


def quantize(
    x: torch.Tensor, spec: QuantSpec, *, codes: bool = True, fake: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the fused quantizer on ``x`` ``(..., K)``.

    Returns ``(codes, scales, q, mask)``: codes int8 ``(..., K)`` in the rotated basis (None unless
    ``codes``), scales fp32 ``(..., K // group)`` (the grid step), ``q`` in the dtype and basis of
    ``x`` and the bool trust mask in the rotated basis (both None unless ``fake``).
    """
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"the Triton quantizer takes {_FLOAT_DTYPES} inputs, got {x.dtype}")
    check_device(x)
    k = x.shape[-1]
    layout = tiles.quant_layout(k, spec)
    segment, chunk, groups_per_chunk, group = layout.segment, layout.chunk, layout.groups_per_chunk, layout.group
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()  # any row stride is fine; the outputs are contiguous
    m = x2.shape[0]
    n_scales = k // group
    scales = torch.empty(m, n_scales, dtype=torch.float32, device=x.device)
    codes_out = torch.empty(m, k, dtype=torch.int8, device=x.device) if codes else None
    q = torch.empty(m, k, dtype=x.dtype, device=x.device) if fake else None
    mask = torch.empty(m, k, dtype=torch.int8, device=x.device) if fake else None
    had = (
        block_diagonal_hadamard(chunk, spec.hadamard_block, x.device)
        if spec.hadamard_block
        else torch.empty(1, device=x.device)
    )
    step_divisor, min_step, zero_step = step_rule(spec)
    block_m = 64 if interpreting() else tiles.QUANT_BLOCK_M
    grid = (triton.cdiv(m, block_m), k // segment)
    if m:
        _quantize_kernel[grid](
            x2,
            had,
            codes_out if codes else scales,
            scales,
            q if fake else scales,
            mask if fake else scales,
            m,
            segment,
            x2.stride(0),
            k,
            n_scales,
            spec.clip_alpha,
            step_divisor,
            float(spec.qmin),
            float(spec.qmax),
            min_step,
            zero_step,
            CHUNK=chunk,
            GROUPS_PER_CHUNK=groups_per_chunk,
            GROUP_LEN=group,
            BLOCK_M=block_m,
            HADAMARD=bool(spec.hadamard_block),
            MIDRISE=bool(spec.code_offset),
            MSE=spec.scale_rule == "mse",
            STORE_CODES=codes,
            STORE_Q=fake,
            # With a rotation, pipelining would keep several copies of the 64 KiB Hadamard tile in shared
            # memory (264 KiB at 3 stages, over H100's 227 KiB); the layout then asks for one stage (72 KiB).
            num_stages=layout.num_stages,
            # No FMA contraction: products round as in the torch twin (the trust mask compares |q - x|).
            enable_fp_fusion=False,
        )
    lead = x.shape[:-1]
    return (
        codes_out.reshape(x.shape) if codes else None,
        scales.reshape(*lead, n_scales),
        q.reshape(x.shape) if fake else None,
        mask.view(torch.bool).reshape(x.shape) if fake else None,
    )


def quantize_rows(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 codes, fp32 scales)``, the Triton twin of :func:`hf_cage.kernels.reference.quantize_rows`."""
    codes, scales, _, _ = quantize(x, spec, codes=True, fake=False)
    return codes, scales


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q(x), mask)``, the Triton twin of :func:`hf_cage.kernels.reference.fake_quantize`."""
    _, _, q, mask = quantize(x, spec, codes=False, fake=True)
    return q, mask

"""Triton kernel: fused FP4 quantization (rotate, group scale, E2M1 rounding) for MXFP4 and NVFP4.

The torch twin is :mod:`hf_cage.kernels.fp4`; this module has the same ``quantize`` / ``fake_quantize``
signatures and the same numerics (that module's docstring gives the rules).

Layout. ``x`` is viewed as ``(M, K)`` and cut into tiles of ``BLOCK_M`` rows x ``CHUNK`` inputs, one
program each, where ``CHUNK = max(group, hadamard_block)`` (group 32 for MXFP4, 16 for NVFP4), so a
tile holds whole groups and whole Hadamard blocks: one load, the rotation as one ``tl.dot`` with the
block-diagonal ``kron(I, H)``, the group max, the scale, the rounding and the stores.

Numerics, exactly as the twin, without approximate instructions:

- MXFP4 exponent: the fp32 bits of ``amax`` plus ``1 << 21``, exponent field ``e``; the E8M0 byte is
  ``clamp(e - 2, 0, 255)`` (255 for inf), the scale ``2^(byte - 127)`` built from its bits.
- NVFP4 group scale: ``gs * (amax / 6)`` (IEEE division; rounded to bf16 / fp16 first for such inputs,
  as compressed-tensors computes it in the input dtype), clamped to 448 and rounded to E4M3 by hand
  (round half to even at a step of ``2^(exponent - 3)``, ``2^-9`` below ``2^-6``); a zero becomes 0.125.
  The launcher turns the stored fp32 value into ``float8_e4m3fn`` (exact). Effective scale ``s8 / gs``.
- E2M1: the seven thresholds of compressed-tensors' ``cast_to_fp4`` (ties to the even mantissa).

The NVFP4 weight rule needs the tensor's global scale before any group scale: without a given
``global_scale`` the launcher first runs the kernel in an amax-only mode (rotated group maxima), then
computes ``448 * 6 / amax`` with the twin's function. Under ``TRITON_INTERPRET=1`` casts to bf16
truncate, so ``Q(x)`` in bf16 may be one bf16 ulp off there (exact on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fp4
from .triton_common import block_diagonal_hadamard, check_device, interpreting, round_half_even

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_CHUNK = 128
_SCALE_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _round_to_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32; by bits, so the interpreter agrees."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to_e4m3(v):
    """Non-negative fp32 ``v <= 448`` -> the nearest float8_e4m3fn value (ties to even), in fp32."""
    exponent = (v.to(tl.int32, bitcast=True) >> 23) & 0xFF
    # step 2^(e - 127 - 3) for normals (v >= 2^-6), 2^-9 for subnormals; built from bits.
    step_bits = tl.where(v >= 0.015625, (exponent - 3) << 23, 118 << 23)
    step = step_bits.to(tl.float32, bitcast=True)
    return round_half_even(v / step) * step


@triton.jit
def _e2m1_magnitude(a):
    """|v| (already scaled) -> magnitude index 0..7, compressed-tensors' thresholds."""
    m = (a > 0.25).to(tl.int32)
    m += (a >= 0.75).to(tl.int32)
    m += (a > 1.25).to(tl.int32)
    m += (a >= 1.75).to(tl.int32)
    m += (a > 2.5).to(tl.int32)
    m += (a >= 3.5).to(tl.int32)
    m += (a > 5.0).to(tl.int32)
    return m


@triton.jit
def _e2m1_value(m):
    """Magnitude index 0..7 -> 0, 0.5, 1, 1.5, 2, 3, 4, 6."""
    low = m.to(tl.float32) * 0.5
    high = (2.0 + (m & 1).to(tl.float32)) * tl.where(m >= 6, 2.0, 1.0)
    return tl.where(m < 4, low, high)


@triton.jit
def _fp4_quantize_kernel(
    x_ptr,
    had_ptr,
    gs_ptr,
    codes_ptr,
    scales_ptr,
    q_ptr,
    mask_ptr,
    amax_ptr,
    M,
    stride_xm,
    n_groups,
    CHUNK: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HADAMARD: tl.constexpr,
    NVFP4: tl.constexpr,
    SCALE_ROUND: tl.constexpr,
    AMAX_ONLY: tl.constexpr,
    STORE_CODES: tl.constexpr,
    STORE_Q: tl.constexpr,
):
    GROUPS: tl.constexpr = CHUNK // GROUP
    pid_m = tl.program_id(0)
    tile = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, CHUNK)
    col0 = tile * CHUNK
    x = tl.load(x_ptr + rows[:, None] * stride_xm + (col0 + cols)[None, :], mask=row_ok[:, None], other=0.0)
    x = x.to(tl.float32)
    if HADAMARD:
        x = tl.dot(x, tl.load(had_ptr + cols[:, None] * CHUNK + cols[None, :]), input_precision="ieee")
    xg = tl.reshape(x, (BLOCK_M, GROUPS, GROUP))
    amax = tl.max(tl.abs(xg), axis=2)
    group_cols = tile * GROUPS + tl.arange(0, GROUPS)
    scale_offs = rows[:, None] * n_groups + group_cols[None, :]
    if AMAX_ONLY:
        tl.store(amax_ptr + scale_offs, amax, mask=row_ok[:, None])
        return

    if NVFP4:
        gs = tl.load(gs_ptr)
        base = tl.div_rn(amax, tl.full((BLOCK_M, GROUPS), 6.0, tl.float32))
        if SCALE_ROUND == 1:
            base = _round_to_bf16(base)
        elif SCALE_ROUND == 2:
            base = base.to(tl.float16).to(tl.float32)
        s8 = _round_to_e4m3(tl.minimum(gs * base, 448.0))
        s8 = tl.where(s8 == 0.0, 0.125, s8)
        tl.store(scales_ptr + scale_offs, s8, mask=row_ok[:, None])
        step = tl.div_rn(s8, tl.full((BLOCK_M, GROUPS), 1.0, tl.float32) * gs)
    else:
        field = ((amax.to(tl.int32, bitcast=True) + (1 << 21)) >> 23) & 0xFF
        byte = tl.where(field == 255, 255, tl.maximum(field - 2, 0))
        tl.store(scales_ptr + scale_offs, byte.to(tl.uint8), mask=row_ok[:, None])
        step = tl.where(byte > 0, byte << 23, 1 << 22).to(tl.float32, bitcast=True)

    step3 = step[:, :, None]
    scaled = tl.div_rn(xg, step3)
    magnitude = _e2m1_magnitude(tl.abs(scaled))
    offs = rows[:, None] * stride_xm + (col0 + cols)[None, :]
    if STORE_CODES:
        code = magnitude | tl.where(scaled < 0.0, 8, 0)
        tl.store(codes_ptr + offs, tl.reshape(code, (BLOCK_M, CHUNK)).to(tl.int8), mask=row_ok[:, None])
    if STORE_Q:
        trusted = tl.abs(scaled) <= 6.0
        tl.store(mask_ptr + offs, tl.reshape(trusted, (BLOCK_M, CHUNK)).to(tl.int8), mask=row_ok[:, None])
        value = _e2m1_value(magnitude)
        value = tl.where(scaled < 0.0, -value, value) * step3
        q = tl.reshape(value, (BLOCK_M, CHUNK))
        if HADAMARD:
            q = tl.dot(q, tl.load(had_ptr + cols[:, None] * CHUNK + cols[None, :]), input_precision="ieee")
        tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=row_ok[:, None])


def _chunk(k: int, fmt: str, hadamard_block: int | None) -> tuple[int, int]:
    group = fp4.check_format(fmt)
    block = hadamard_block or 1
    if k % group or k % block:
        raise ValueError(f"last dimension {k} must be a multiple of the {fmt} group size {group} and hadamard_block")
    if block > _MAX_CHUNK:
        raise ValueError(f"hadamard_block={block} is wider than {_MAX_CHUNK}; the Triton kernel rotates up to 128")
    return max(group, block), group


def quantize(
    x: torch.Tensor,
    fmt: str,
    *,
    hadamard_block: int | None = None,
    global_scale: torch.Tensor | None = None,
    codes: bool = True,
    fake: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the fused FP4 quantizer on ``x`` ``(..., K)``.

    Returns ``(codes, scales, global_scale, q, mask)``: codes int8 ``(..., K)`` (4-bit E2M1 codes, rotated
    basis; None unless ``codes``), scales ``(..., K // group)`` (uint8 E8M0 or float8_e4m3fn), the fp32
    ``(1,)`` global scale (nvfp4; None for mxfp4), ``q`` in the dtype and basis of ``x`` and the bool clip
    mask in the rotated basis (both None unless ``fake``).
    """
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"the Triton FP4 quantizer takes {_FLOAT_DTYPES} inputs, got {x.dtype}")
    check_device(x)
    k = x.shape[-1]
    chunk, group = _chunk(k, fmt, hadamard_block)
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    n_groups = k // group
    nvfp4 = fmt == "nvfp4"
    had = (
        block_diagonal_hadamard(chunk, hadamard_block, x.device) if hadamard_block else torch.empty(1, device=x.device)
    )
    block_m = 64 if interpreting() else 16
    grid = (triton.cdiv(m, block_m), k // chunk)
    scale_dtype = x.dtype if not hadamard_block else torch.float32

    def launch(scales, gs, codes_out, q, mask, amax, amax_only):
        if not m:
            return
        _fp4_quantize_kernel[grid](
            x2,
            had,
            gs,
            codes_out,
            scales,
            q,
            mask,
            amax,
            m,
            x2.stride(0),
            n_groups,
            CHUNK=chunk,
            GROUP=group,
            BLOCK_M=block_m,
            HADAMARD=bool(hadamard_block),
            NVFP4=nvfp4,
            SCALE_ROUND=_SCALE_ROUND[scale_dtype],
            AMAX_ONLY=amax_only,
            STORE_CODES=codes,
            STORE_Q=fake,
            enable_fp_fusion=False,
        )

    dummy = torch.empty(1, dtype=torch.float32, device=x.device)
    if nvfp4 and global_scale is None:
        amax = torch.empty(m, n_groups, dtype=torch.float32, device=x.device)
        launch(dummy, dummy, dummy, dummy, dummy, amax, True)
        total = amax.amax() if amax.numel() else amax.new_zeros(())
        global_scale = fp4.nvfp4_global_scale(total.to(scale_dtype))
    if nvfp4:
        global_scale = global_scale.float().reshape(1).to(x.device)
    scales = torch.empty(m, n_groups, dtype=torch.float32 if nvfp4 else torch.uint8, device=x.device)
    codes_out = torch.empty(m, k, dtype=torch.int8, device=x.device) if codes else None
    q = torch.empty_like(x2) if fake else None
    mask = torch.empty(m, k, dtype=torch.int8, device=x.device) if fake else None
    launch(
        scales,
        global_scale if nvfp4 else dummy,
        codes_out if codes else dummy,
        q if fake else dummy,
        mask if fake else dummy,
        dummy,
        False,
    )
    if nvfp4:
        scales = scales.to(torch.float8_e4m3fn)  # exact: the kernel rounded to E4M3 values
    lead = x.shape[:-1]
    return (
        codes_out.reshape(x.shape) if codes else None,
        scales.reshape(*lead, n_groups),
        global_scale if nvfp4 else None,
        q.reshape(x.shape) if fake else None,
        mask.view(torch.bool).reshape(x.shape) if fake else None,
    )


def quantize_codes(
    x: torch.Tensor, fmt: str, *, hadamard_block: int | None = None, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(codes, scales, global_scale)``, the Triton twin of :func:`hf_cage.kernels.fp4.quantize`."""
    codes, scales, gs, _, _ = quantize(x, fmt, hadamard_block=hadamard_block, global_scale=global_scale, fake=False)
    return codes, scales, gs


def fake_quantize(
    x: torch.Tensor, fmt: str, *, hadamard_block: int | None = None, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q(x), mask)``, the Triton twin of :func:`hf_cage.kernels.fp4.fake_quantize`."""
    _, _, _, q, mask = quantize(x, fmt, hadamard_block=hadamard_block, global_scale=global_scale, codes=False)
    return q, mask

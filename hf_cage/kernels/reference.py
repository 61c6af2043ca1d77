"""Pure-torch twins of every hf-cage kernel: the CPU path and the oracle the Triton kernels are tested against.

Numerics, in plain words. A tensor ``x`` of shape ``(..., K)`` is quantized row by row along its
last dimension (a weight's input features, an activation's hidden size):

1. optionally rotate each consecutive block of ``hadamard_block`` inputs by a normalized Hadamard
   matrix ``H`` (orthogonal and symmetric, so applying it twice is the identity; rotating weights
   and activations alike leaves ``x @ W.T`` unchanged while spreading outliers);
2. split the row into groups (``group_size``, or the whole row) and give each group a ``step``:
   with the ``mse`` rule the clip value is ``s = alpha_b * RMS(group)``, with ``absmax`` it is the
   largest magnitude; ``step = 2 s / (2^b - 1)`` (for the integer grid with ``absmax``,
   ``step = absmax / (2^(b-1) - 1)`` so the extreme value is representable; ``minmax`` is
   compressed-tensors' dynamic activation rule, ``step = absmax / ((2^b - 1) / 2)``, bit for bit);
3. round to integer codes in ``[-2^(b-1), 2^(b-1) - 1]`` and map back with
   ``(code + code_offset) * step``; the mid-rise grid is QuEST's (docs/method.md):
   ``q = (round(clip(x, -s, s) / step + 1/2) - 1/2) * step``;
4. rotate back, so the result lives in the same basis as ``x``.

All maths is fp32 whatever the input dtype; results are cast back to the input dtype.

The GEMM twins (:func:`w4a4_matmul_reference`, :func:`w4a16_matmul_reference`) take the packed int4 weights
the Triton GEMMs take and compute the same sums: W4A4 exactly in integers, then the kernel's epilogue order.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .packing import unpack_int4
from .spec import QuantSpec


@functools.lru_cache(maxsize=32)
def _sylvester(block: int, device: str, dtype: torch.dtype, normalized: bool) -> torch.Tensor:
    if block & (block - 1):
        raise ValueError(f"hadamard_block={block} must be a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / block**0.5 if normalized else h).to(device=device, dtype=dtype)


def hadamard_matrix(block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix, shape ``(block, block)``, fp32 (orthogonal, symmetric)."""
    return _sylvester(block, str(torch.device(device)), torch.float32, True)


ROTATIONS = ("auto", "butterfly", "matmul")
_rotation = "auto"
# Widest block the butterfly rotation multiplies by a dense +-1 matrix before its butterfly stages, and the size
# below which one matmul beats the butterfly's fixed cost per pass: both chosen on CPU (docs/benchmarks.md).
_DENSE_INNER = 16
_BUTTERFLY_MIN_NUMEL = 2**16


@contextlib.contextmanager
def rotation(method: str):
    """Run :func:`hadamard_rotate` with ``method`` inside the block (benchmarks and tests compare them).

    ``"matmul"``: one dense multiply by ``H``; ``"butterfly"``: the fast Walsh-Hadamard transform;
    ``"auto"`` (the default): butterfly on CPU for tensors of at least 64K values, matmul otherwise (a GPU
    multiplies a 128-wide block at full speed, and its hot path is the Triton kernels anyway).
    """
    global _rotation
    if method not in ROTATIONS:
        raise ValueError(f"rotation method {method!r} is not supported; choose one of {ROTATIONS}")
    previous, _rotation = _rotation, method
    try:
        yield
    finally:
        _rotation = previous


def _butterfly(x: torch.Tensor, block: int) -> torch.Tensor:
    """Fast Walsh-Hadamard transform of each ``block``-wide slice, Sylvester order, normalized.

    ``H_block = H_(block/inner) kron H_inner``: the lowest ``inner`` index bits are one multiply by
    ``H_inner`` scaled by ``1/sqrt(block)`` (so no separate scaling pass), each higher bit one butterfly stage
    (``(a, b) -> (a + b, a - b)`` on halves ``h`` apart): ``log2(block / inner)`` adds per value instead of
    ``block`` multiply-adds. Sums run in another order than the matmul (see :func:`rotation_error_bound`).
    """
    inner = min(block, _DENSE_INNER)
    h_inner = _sylvester(inner, str(x.device), x.dtype, False) * block**-0.5
    y = (x.reshape(-1, inner) @ h_inner).reshape(-1, block)
    if inner == block:
        return y.reshape(x.shape)
    spare = torch.empty_like(y)
    h = inner
    while h < block:
        src, dst = y.view(-1, block // (2 * h), 2, h), spare.view(-1, block // (2 * h), 2, h)
        torch.add(src[:, :, 0], src[:, :, 1], out=dst[:, :, 0])
        torch.sub(src[:, :, 0], src[:, :, 1], out=dst[:, :, 1])
        y, spare = spare, y
        h *= 2
    return y.reshape(x.shape)


def hadamard_rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """Multiply each ``block``-wide slice of the last dimension by ``H``; its own inverse. fp32 in, fp32 out.

    On CPU by the fast transform (large tensors; :func:`rotation` switches), else by a matmul; both stay within
    :func:`rotation_error_bound` of the exact product, not bit-identical to each other.
    """
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"last dimension {k} is not a multiple of hadamard_block={block}")
    method = _rotation
    if method == "auto":
        fast = x.device.type == "cpu" and x.numel() >= _BUTTERFLY_MIN_NUMEL
        method = "butterfly" if fast else "matmul"
    if method == "butterfly" and x.numel():
        return _butterfly(x, block)
    h = _sylvester(block, str(x.device), x.dtype, True)
    return (x.reshape(*x.shape[:-1], k // block, block) @ h).reshape(x.shape)


def rotation_error_bound(x: torch.Tensor, block: int) -> torch.Tensor:
    """Largest possible error of any fp32 evaluation of ``hadamard_rotate(x, block)``, per element, fp32.

    Each output is a ``block``-term dot product with weights ``+-1/sqrt(block)``. Whatever the summation
    order (a BLAS matmul, whose order depends on the CPU and thread count, a GPU ``tl.dot``, a butterfly),
    the fp32 result lies within ``gamma_(block+1) * sum|x_i| / sqrt(block)`` of the exact value, with
    ``gamma_n = n u / (1 - n u)``, ``u = 2^-24`` (Higham, *Accuracy and Stability*, section 3.1; the ``+1``
    covers ``1/sqrt(block)`` rounded to fp32). Two implementations can therefore differ by twice this, and a
    value rounded right after a rotation can land on either side of a rounding tie within that distance.
    """
    k = x.shape[-1]
    u = 2.0**-24
    gamma = (block + 1) * u / (1 - (block + 1) * u)
    l1 = x.double().abs().reshape(*x.shape[:-1], k // block, block).sum(-1, keepdim=True)
    return (gamma * l1 / block**0.5).expand(*x.shape[:-1], k // block, block).reshape(x.shape).float()


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``(..., K)`` as ``(..., G, group)``."""
    k = x.shape[-1]
    group = spec.group_size or k
    if k % group:
        raise ValueError(f"last dimension {k} is not a multiple of group_size={group}")
    return x.reshape(*x.shape[:-1], k // group, group)


def _rotated_fp32(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    x = x.float()
    return hadamard_rotate(x, spec.hadamard_block) if spec.hadamard_block else x


def _divide(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``x / divisor``, correctly rounded on every device (CUDA turns a division by a Python scalar into a
    multiplication by its reciprocal, which can differ by an ulp from the Triton kernel and compressed-tensors)."""
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)


def _clip_and_step(groups: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group clip value ``s`` and ``step``, shape ``(..., G, 1)``, from fp32 groups."""
    if spec.scale_rule == "mse":
        clip = spec.clip_alpha * groups.square().mean(-1, keepdim=True).sqrt()
    else:
        clip = groups.abs().amax(-1, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny
    if spec.scale_rule == "minmax":
        # compressed-tensors' calculate_qparams: absmax / (bit_range / 2), a zero scale replaced by eps.
        step = _divide(clip, (2**spec.bits - 1) / 2)
        step = torch.where(step == 0, torch.finfo(torch.float32).eps, step)
        return clip.clamp_min(tiny), step
    if not spec.code_offset and spec.scale_rule == "absmax":  # integer grid: the extreme value is a level
        step = _divide(clip, spec.qmax)
    else:
        step = _divide(2 * clip, 2**spec.bits - 1)
    # An all-zero group gets the smallest normal step instead of 0/0.
    return clip.clamp_min(tiny), step.clamp_min(tiny)


def _codes(groups: torch.Tensor, clip: torch.Tensor, step: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (as fp32) in ``[qmin, qmax]``. (In-place steps on one fresh tensor: the same operations in the
    same order as the expressions in the comments, without a new allocation per step.)"""
    if spec.code_offset:  # mid-rise: round(clamp(x, -clip, clip) / step + 0.5) - 1
        return torch.clamp(groups, -clip, clip).div_(step).add_(0.5).round_().sub_(1)
    # compressed-tensors' order: divide, add the zero point (0; it turns -0.0 into 0.0), clamp, round.
    return (groups / step).add_(0.0).clamp_(spec.qmin, spec.qmax).round_()


def _with_offset(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``code + code_offset``; the integer grid adds nothing (``-0.0 + 0`` would lose the sign
    compressed-tensors keeps)."""
    return codes + spec.code_offset if spec.code_offset else codes


def quantize_rows(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along the last dimension (after the optional rotation).

    Args:
        x: ``(..., K)``, any float dtype.
    Returns:
        codes: int8, ``(..., K)``, in ``[qmin, qmax]``, in the rotated basis.
        scales: fp32, ``(..., K // group)`` (``group = K`` for per-row scales): the grid step.
    """
    groups = _grouped(_rotated_fp32(x, spec), spec)
    clip, step = _clip_and_step(groups, spec)
    codes = _codes(groups, clip, step, spec)
    return codes.to(torch.int8).reshape(x.shape), step.squeeze(-1)


def dequantize_rows(
    codes: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_rows`: ``(code + code_offset) * scale``, rotated back, cast to ``dtype``."""
    values = _with_offset(_grouped(codes.float(), spec), spec)
    x = (values * scales.float().unsqueeze(-1)).reshape(codes.shape)
    if spec.hadamard_block:
        x = hadamard_rotate(x, spec.hadamard_block)
    return x.to(dtype)


def _quantize(x: torch.Tensor, spec: QuantSpec, with_codes: bool):
    groups = _grouped(_rotated_fp32(x, spec), spec)
    clip, step = _clip_and_step(groups, spec)
    codes = _codes(groups, clip, step, spec)
    q = (codes + spec.code_offset).mul_(step) if spec.code_offset else codes * step
    mask = ((q - groups).abs_() <= step * 0.5).reshape(x.shape)
    q = q.reshape(x.shape)
    if spec.hadamard_block:
        q = hadamard_rotate(q, spec.hadamard_block)
    if not with_codes:
        return q.to(x.dtype), mask
    return codes.to(torch.int8).reshape(x.shape), step.squeeze(-1), q.to(x.dtype), mask


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q(x)`` in the basis and dtype of ``x``, plus the straight-through mask.

    Returns:
        q: same shape and dtype as ``x``.
        mask: bool, same shape, in the rotated basis: True where ``|Q - x| <= step / 2``
            (QuEST's trust mask; False only where the value was clipped).
    """
    return _quantize(x, spec, with_codes=False)


def quantize_with_codes(
    x: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` and :func:`fake_quantize` in one pass: ``(codes, scales, q, mask)``, each exactly
    what those two return."""
    return _quantize(x, spec, with_codes=True)


def int_matmul_reference(
    x_codes: torch.Tensor,
    x_scales: torch.Tensor,
    w_codes: torch.Tensor,
    w_scales: torch.Tensor,
    x_offset: float = 0.0,
    w_offset: float = 0.0,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``((Xc + x_offset) * sx) @ ((Wc + w_offset) * sw).T`` for per-token / per-channel scales.

    Args:
        x_codes: int8 ``(M, K)``; x_scales: fp32 ``(M,)`` or ``(M, 1)``.
        w_codes: int8 ``(N, K)``; w_scales: fp32 ``(N,)`` or ``(N, 1)``.
    Returns ``(M, N)`` in ``out_dtype``. The integer part is exact: ``Xc @ Wc.T`` in int32, the
    offsets enter through row sums, ``(Xc+a)(Wc+b)^T = XcWc^T + b*rowsum(Xc) + a*rowsum(Wc) + abK``.
    """
    k = x_codes.shape[-1]
    acc = (x_codes.to(torch.int32) @ w_codes.to(torch.int32).T).float()
    if w_offset:
        acc = acc + w_offset * x_codes.to(torch.int32).sum(-1, keepdim=True).float()
    if x_offset:
        acc = acc + x_offset * w_codes.to(torch.int32).sum(-1).float()
    if x_offset and w_offset:
        acc = acc + x_offset * w_offset * k
    return (acc * x_scales.reshape(-1, 1).float() * w_scales.reshape(1, -1).float()).to(out_dtype)


def dequantized_packed(w_packed: torch.Tensor, w_scales: torch.Tensor, w_offset: float) -> torch.Tensor:
    """fp32 ``(N, K)`` weights ``(code + w_offset) * scale`` from packed words and ``(N,)``/``(N, G)`` scales."""
    codes = unpack_int4(w_packed).float()
    n, k = codes.shape
    scales = w_scales.float().reshape(n, -1)
    return ((codes.reshape(n, scales.shape[1], -1) + w_offset) * scales.unsqueeze(-1)).reshape(n, k)


def w4a4_matmul_reference(
    x_codes: torch.Tensor,
    x_scales: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    *,
    x_offset: float = 0.0,
    w_offset: float = 0.0,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Twin of the W4A4 GEMM: per-channel scales go through :func:`int_matmul_reference` (exact integer part,
    the kernel's epilogue order); per-group scales sum each group's exact integer dot times its scale."""
    n = w_packed.shape[0]
    w_codes = unpack_int4(w_packed)
    scales = w_scales.float().reshape(n, -1)
    if scales.shape[1] == 1:
        return int_matmul_reference(x_codes, x_scales, w_codes, scales, x_offset, w_offset, out_dtype)
    groups = scales.shape[1]
    m, k = x_codes.shape
    xg = (x_codes.double() + x_offset).reshape(m, groups, k // groups)
    wg = (w_codes.double() + w_offset).reshape(n, groups, k // groups)
    dots = torch.einsum("mgk,ngk->mng", xg, wg).float()  # exact: small integers (or quarters) in fp64
    acc = (dots * scales.unsqueeze(0)).sum(-1)
    return (acc * x_scales.reshape(-1, 1).float()).to(out_dtype)


def w4a16_matmul_reference(
    x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, *, w_offset: float = 0.0
) -> torch.Tensor:
    """Twin of the W4A16 GEMM: dequantize to the dtype of ``x``, then ``x @ W.T``."""
    return x @ dequantized_packed(w_packed, w_scales, w_offset).to(x.dtype).T

"""Pure-torch twins of the two FP4 grids, MXFP4 and NVFP4, bit for bit as compressed-tensors computes them.

Both grids store each value as E2M1 (1 sign, 2 exponent, 1 mantissa bit): magnitudes ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``,
one scale per group of consecutive inputs along the last dimension. A tensor ``x`` of shape ``(..., K)`` is
quantized row by row, as in :mod:`hf_cage.kernels.reference`:

1. optionally rotate each block of ``hadamard_block`` inputs (:func:`hf_cage.kernels.reference.hadamard_rotate`);
2. give each group a scale from its largest magnitude ``amax``:

   - ``mxfp4`` (groups of 32): a power of two stored as an E8M0 byte,
     ``e8m0 = clamp(127 + floor(log2(p2(amax))) - 2, 0, 255)``, ``scale = 2^(e8m0 - 127)``, with ``p2``
     compressed-tensors' ``round_to_power_2`` (:func:`mx_scale_exponents`). So ``amax / scale`` lies in ``[4, 7)``;
     values in ``(6, 7)`` clip to 6.
   - ``nvfp4`` (groups of 16): an FP8 E4M3 group scale ``s8 = e4m3(clamp(gs * (amax / 6), -448, 448))`` (a zero
     becomes 0.125) with one fp32 global scale per tensor ``gs = 448 * 6 / amax(tensor)``; the effective scale is
     ``s8 / gs``. Weights take ``gs`` from the tensor (``global_scale=None``); activations must pass the layer's
     calibrated static ``global_scale`` to be quantized as the serving loader does.
3. ``code = e2m1(clamp(x / scale, -6, 6))``: the nearest E2M1 value, ties to the even mantissa (0.25 -> 0,
   0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4); ``Q(x) = e2m1_value(code) * scale``;
4. rotate back.

Codes are int8 in ``[0, 15]``: bit 3 is the sign, bits 0-2 index ``E2M1_VALUES``. A negative value that rounds to
zero keeps its sign (code 8, ``-0.0``); ``-0.0`` itself gives code 0. Packing puts two codes in a byte, the
even-indexed input in the low nibble. All maths is fp32 and ``Q(x)`` is cast back to the input dtype, except that
for an unrotated bf16 / fp16 input the NVFP4 scale arithmetic runs in that dtype, as compressed-tensors does.
How exports on these grids load and serve: docs/quantization.md.
"""

from __future__ import annotations

import torch

from .reference import hadamard_rotate

GROUP_SIZE = {"mxfp4": 32, "nvfp4": 16}  # the formats this twin implements, and their group sizes

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
E4M3_ZERO_SCALE = 0.125  # what compressed-tensors puts in place of a zero e4m3 scale
E8M0_BIAS = 127
MX_EXPONENT_OFFSET = 2  # floor(log2(E2M1_MAX))

# Upper edges of the E2M1 rounding buckets and whether the edge itself goes up (a tie to the even
# mantissa): |v| > 0.25 -> 0.5, >= 0.75 -> 1, > 1.25 -> 1.5, >= 1.75 -> 2, > 2.5 -> 3, >= 3.5 -> 4, > 5 -> 6.
_E2M1_EDGES = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def check_format(fmt: str) -> int:
    """Group size of ``fmt``; raise a ``ValueError`` naming the choices otherwise."""
    if fmt not in GROUP_SIZE:
        raise ValueError(f"FP4 format {fmt!r} is not supported; choose one of {tuple(GROUP_SIZE)}")
    return GROUP_SIZE[fmt]


def _tensor(value: float, like: torch.Tensor) -> torch.Tensor:
    # A 0-dim tensor, not a Python float: CUDA turns a division by a Python scalar into a multiplication
    # by its reciprocal, which can differ by an ulp from compressed-tensors (which divides by tensors).
    return torch.full((), value, dtype=like.dtype, device=like.device)


# --- E2M1 ------------------------------------------------------------------------------------------


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """Round ``v`` (already divided by its scale) to E2M1, as 4-bit codes (int8 in ``[0, 15]``).

    Clamps to ``[-6, 6]`` first. Sign bit set for ``v < 0`` (so ``-0.1`` gives code 8, ``-0.0`` gives 0).
    """
    a = v.float().abs()
    magnitude = torch.zeros(v.shape, dtype=torch.int8, device=v.device)
    for edge, inclusive in _E2M1_EDGES:
        magnitude += (a >= edge) if inclusive else (a > edge)
    return magnitude | ((v < 0).to(torch.int8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes -> fp32 values (code 8 is ``-0.0``)."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    codes = codes.long()
    magnitude = table[codes & 7]
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """``v`` rounded to the nearest E2M1 value (clamped to ``[-6, 6]``), fp32."""
    return e2m1_values(e2m1_codes(v))


# --- scales ----------------------------------------------------------------------------------------


def mx_scale_exponents(amax: torch.Tensor) -> torch.Tensor:
    """E8M0 biased exponents (uint8) for groups with largest magnitude ``amax`` (fp32, >= 0).

    ``round_to_power_2``: add ``1 << 21`` to the fp32 bits (a quarter of the lowest exponent step:
    mantissas ``>= 1.75`` carry into the exponent) and keep sign + exponent; then
    ``127 + exponent - 2``, clamped to ``[0, 255]``. A zero group gets 0 (scale ``2^-127``).
    """
    bits = amax.float().contiguous().view(torch.int32)
    power_of_two = ((bits + (1 << 21)) & ~((1 << 23) - 1)).view(torch.float32)
    exponent = torch.floor(torch.log2(power_of_two)) + (E8M0_BIAS - MX_EXPONENT_OFFSET)
    return torch.round(torch.clamp(exponent, 0, 255)).to(torch.uint8)


def mx_scales(exponents: torch.Tensor) -> torch.Tensor:
    """E8M0 biased exponents (uint8) -> fp32 scales ``2^(e - 127)``."""
    return torch.pow(2.0, (exponents.to(torch.int32) - E8M0_BIAS).float())


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``generate_gparam``: ``448 * 6 / amax``, returned as fp32, shape ``(1,)``.

    Computed in the dtype of ``amax`` (compressed-tensors divides in the tensor's dtype: bf16 for a bf16
    weight), ``amax`` clamped to that dtype's smallest normal; NaN or inf become 1 (no global scaling).
    A Python number divided by a tensor is ``number * (1 / amax)`` in torch (two roundings: amax 448
    gives 6.0000005, not 6); compressed-tensors writes it that way, so this does too.
    """
    amax = amax.clamp(min=torch.finfo(amax.dtype).tiny)
    scale = (E4M3_MAX * E2M1_MAX) / amax
    return torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0).float().reshape(1)


def nvfp4_group_scales(amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 group scales ``e4m3(clamp(gs * (amax / 6), +-448))``, a zero replaced by 0.125.

    ``amax / 6`` is computed in the dtype of ``amax`` (as compressed-tensors does for a bf16 activation),
    the product with the fp32 global scale in fp32.
    """
    scale = global_scale.float() * (amax / _tensor(E2M1_MAX, amax)).float()
    scale = torch.clamp(scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    zero = torch.tensor(E4M3_ZERO_SCALE, dtype=torch.float8_e4m3fn, device=scale.device)
    return torch.where(scale.float() == 0, zero, scale)


def tensor_global_scale(x: torch.Tensor, hadamard_block: int | None = None) -> torch.Tensor:
    """``448 * 6 / amax`` of the whole (rotated) ``x``, fp32 ``(1,)``: the NVFP4 weight rule, and one observation
    of the static_minmax rule that calibrates an ``input_global_scale`` (the scale of the running amax is the
    minimum of the observed scales: the formula is monotone). Arithmetic in the dtype :func:`quantize` uses."""
    dtype = _scale_dtype(x, hadamard_block)
    x = x.float()
    if hadamard_block:
        x = hadamard_rotate(x, hadamard_block)
    amax = x.abs().amax() if x.numel() else x.new_zeros(())
    return nvfp4_global_scale(amax.to(dtype))


def effective_scales(scales: torch.Tensor, fmt: str, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Stored scales -> the fp32 factor each group's E2M1 values are multiplied by.

    mxfp4: ``2^(e - 127)``; nvfp4: ``float(s8) / global_scale`` (one fp32 division, as compressed-tensors).
    """
    check_format(fmt)
    if fmt == "mxfp4":
        return mx_scales(scales)
    if global_scale is None:
        raise ValueError("nvfp4 scales need the tensor's global_scale")
    return scales.float() / global_scale.float()


# --- quantizers ------------------------------------------------------------------------------------


def _scale_dtype(x: torch.Tensor, hadamard_block: int | None) -> torch.dtype:
    """The dtype compressed-tensors does NVFP4 scale arithmetic in: the input's (fp32 once rotated)."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) and not hadamard_block else torch.float32


def _prepare(x: torch.Tensor, fmt: str, hadamard_block: int | None) -> torch.Tensor:
    """fp32, rotated, viewed as ``(..., G, group)``."""
    group = check_format(fmt)
    k = x.shape[-1]
    if k % group:
        raise ValueError(f"last dimension {k} is not a multiple of the {fmt} group size {group}")
    x = x.float()
    if hadamard_block:
        x = hadamard_rotate(x, hadamard_block)
    return x.reshape(*x.shape[:-1], k // group, group)


def _group_scales(
    groups: torch.Tensor, fmt: str, global_scale: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    amax = groups.abs().amax(-1)
    if fmt == "mxfp4":  # a power of two: the same in every float dtype
        return mx_scale_exponents(amax), None
    amax = amax.to(dtype)  # exact: the values came from ``dtype``
    if global_scale is None:
        global_scale = nvfp4_global_scale(amax.amax() if amax.numel() else amax.new_zeros(()))
    global_scale = global_scale.float().reshape(1).to(groups.device)
    return nvfp4_group_scales(amax, global_scale), global_scale


def _scaled(groups: torch.Tensor, scales: torch.Tensor, fmt: str, global_scale: torch.Tensor | None):
    step = effective_scales(scales, fmt, global_scale).unsqueeze(-1)
    return groups / step, step


def quantize(
    x: torch.Tensor, fmt: str, *, hadamard_block: int | None = None, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize along the last dimension (after the optional rotation).

    Args:
        x: ``(..., K)``, any float dtype, ``K`` a multiple of the group size (32 mxfp4, 16 nvfp4).
        fmt: ``"mxfp4"`` or ``"nvfp4"``.
        global_scale: nvfp4 only: fp32 ``(1,)``; ``None`` computes ``448 * 6 / amax(x)`` over the whole
            (rotated) tensor, the weight rule. Pass the calibrated value for activations.
    Returns:
        codes: int8 ``(..., K)``, 4-bit E2M1 codes in ``[0, 15]``, in the rotated basis.
        scales: ``(..., K // group)``: uint8 E8M0 exponents (mxfp4) or float8_e4m3fn (nvfp4).
        global_scale: fp32 ``(1,)`` for nvfp4, ``None`` for mxfp4.
    """
    groups = _prepare(x, fmt, hadamard_block)
    scales, global_scale = _group_scales(groups, fmt, global_scale, _scale_dtype(x, hadamard_block))
    scaled, _ = _scaled(groups, scales, fmt, global_scale)
    return e2m1_codes(scaled).reshape(x.shape), scales, global_scale


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    fmt: str,
    *,
    global_scale: torch.Tensor | None = None,
    hadamard_block: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``e2m1_value(code) * scale`` in fp32, rotated back, cast to ``dtype``."""
    group = check_format(fmt)
    values = e2m1_values(codes).reshape(*codes.shape[:-1], codes.shape[-1] // group, group)
    x = (values * effective_scales(scales, fmt, global_scale).unsqueeze(-1)).reshape(codes.shape)
    if hadamard_block:
        x = hadamard_rotate(x, hadamard_block)
    return x.to(dtype)


def fake_quantize(
    x: torch.Tensor, fmt: str, *, hadamard_block: int | None = None, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q(x)`` in the basis and dtype of ``x``, plus the straight-through clip mask.

    Returns:
        q: same shape and dtype as ``x``.
        mask: bool, same shape, in the rotated basis: True where ``|x / scale| <= 6``, i.e. where the
            clamp to the E2M1 range did not act (False only where the value was clipped).
    """
    groups = _prepare(x, fmt, hadamard_block)
    scales, global_scale = _group_scales(groups, fmt, global_scale, _scale_dtype(x, hadamard_block))
    scaled, step = _scaled(groups, scales, fmt, global_scale)
    mask = (scaled.abs() <= E2M1_MAX).reshape(x.shape)
    q = (e2m1_round(scaled) * step).reshape(x.shape)
    if hadamard_block:
        q = hadamard_rotate(q, hadamard_block)
    return q.to(x.dtype), mask


# --- packing ---------------------------------------------------------------------------------------


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """``(..., K)`` 4-bit codes -> ``(..., K / 2)`` uint8: input ``2j`` in the low nibble, ``2j + 1`` in the high.

    Byte-for-byte compressed-tensors' ``pack_fp4_to_uint8`` of the E2M1 values (``weight_packed``).
    """
    if codes.dtype.is_floating_point:
        raise TypeError(f"packing takes integer E2M1 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"the last dimension ({codes.shape[-1]}) must be even to pack FP4")
    fields = codes.to(torch.uint8) & 0xF
    pairs = fields.reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: ``(..., K / 2)`` uint8 -> ``(..., K)`` int8 codes in ``[0, 15]``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpacking FP4 takes uint8 bytes, got {packed.dtype}")
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    return codes.reshape(*packed.shape[:-1], -1).to(torch.int8)

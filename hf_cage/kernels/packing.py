"""Integer code packing in the compressed-tensors ``pack-quantized`` layout (4 and 8 bits).

Signed codes along the input dimension are stored as ``code + 2^(bits-1)`` (an unsigned field),
``32 / bits`` to an int32 word, lowest bits first. For int4: code ``j`` of a word sits in bits
``4j .. 4j+3``, and a ``(out, in)`` code matrix becomes ``(out, in / 8)`` int32 words.

Packing builds the words byte-wise: on a little-endian host, byte ``k`` of a word holds bits
``8k .. 8k+7``, so the fields are assembled as uint8 and the buffer is viewed as int32 (several times
faster than shifting in int64).
"""

from __future__ import annotations

import sys

import torch

if sys.byteorder != "little":  # the byte-wise packing below assumes it, as every torch platform is
    raise ImportError("hf_cage packing needs a little-endian host")

PACKABLE_BITS = (4, 8)


def pack_codes(codes: torch.Tensor, bits: int, validate: bool = True) -> torch.Tensor:
    """``(..., K)`` signed integer codes -> ``(..., K * bits / 32)`` int32 words.

    ``validate=False`` skips the range check (a device sync on CUDA) for codes a quantizer just produced.
    """
    if bits not in PACKABLE_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; packable widths are {PACKABLE_BITS}")
    if codes.dtype.is_floating_point:
        raise TypeError(f"packing takes integer codes, got {codes.dtype}")
    per_word = 32 // bits
    if codes.shape[-1] % per_word:
        raise ValueError(f"the last dimension ({codes.shape[-1]}) must be a multiple of {per_word} to pack int{bits}")
    offset = 2 ** (bits - 1)
    if validate and codes.numel():
        low, high = (v.item() for v in torch.aminmax(codes))
        if low < -offset or high >= offset:
            raise ValueError(f"int{bits} codes must lie in [{-offset}, {offset - 1}]")
    fields = (codes.to(torch.int16) + offset).to(torch.uint8)
    if bits == 4:
        pairs = fields.reshape(*codes.shape[:-1], -1, 2)
        fields = pairs[..., 0] | (pairs[..., 1] << 4)
    return fields.contiguous().view(torch.int32).reshape(*codes.shape[:-1], -1)


def unpack_codes(packed: torch.Tensor, bits: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``(..., K * bits / 32)`` int32 words -> ``(..., K)`` codes."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"cannot unpack {bits}-bit codes; packable widths are {PACKABLE_BITS}")
    if packed.dtype != torch.int32:
        raise TypeError(f"unpacking takes int32 words, got {packed.dtype}")
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=packed.device)
    fields = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return (fields - 2 ** (bits - 1)).reshape(*packed.shape[:-1], -1).to(dtype)


def pack_int4(codes: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """``(..., K)`` codes in ``[-8, 7]`` -> ``(..., K / 8)`` int32 words."""
    return pack_codes(codes, 4, validate)


def unpack_int4(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """``(..., K / 8)`` int32 words -> ``(..., K)`` codes in ``[-8, 7]``."""
    return unpack_codes(packed, 4, dtype)


# Widths packed densely across int32 words by compressed-tensors' own ``pack_to_int32`` (what its loaders unpack).
DENSE_PACKED_BITS = (2, 3)


def pack_int_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(out, in)`` signed integer codes -> ``(out, in * bits / 32)`` int32 words of ``pack-quantized``."""
    if bits in DENSE_PACKED_BITS:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        return pack_to_int32(codes.to(torch.int8), bits)
    return pack_codes(codes, bits, validate=False)


def unpack_int_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int_codes`: ``(out, in)`` int8 codes."""
    if bits in DENSE_PACKED_BITS:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        return unpack_from_int32(packed, bits, torch.Size((packed.shape[0], in_features)))
    return unpack_codes(packed, bits)

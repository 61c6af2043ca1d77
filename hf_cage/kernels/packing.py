"""Int4 bit packing in the compressed-tensors ``pack-quantized`` layout.

Signed codes in ``[-8, 7]`` along the input dimension are stored as ``code + 8`` (a nibble in
``[0, 15]``), eight to an int32 word, lowest bits first: code ``j`` of a word sits in bits
``4j .. 4j+3``. A ``(out, in)`` code matrix becomes ``(out, in / 8)`` int32 words.
"""

from __future__ import annotations

import torch

_NIBBLES = 8
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``(..., K)`` integer codes in ``[-8, 7]`` -> ``(..., K / 8)`` int32 words."""
    if codes.shape[-1] % _NIBBLES:
        raise ValueError(f"the last dimension ({codes.shape[-1]}) must be a multiple of 8 to pack int4 codes")
    if codes.dtype.is_floating_point:
        raise TypeError(f"pack_int4 takes integer codes, got {codes.dtype}")
    if codes.numel() and (codes.min() < -8 or codes.max() > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    nibbles = (codes.to(torch.int64) + 8).reshape(*codes.shape[:-1], -1, _NIBBLES)
    words = (nibbles << _SHIFTS.to(codes.device)).sum(-1)
    # Words above 2^31 - 1 wrap to negative int32, as compressed-tensors stores them.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """``(..., K / 8)`` int32 words -> ``(..., K)`` codes in ``[-8, 7]``."""
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_int4 takes int32 words, got {packed.dtype}")
    nibbles = (packed.to(torch.int64).unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return (nibbles - 8).reshape(*packed.shape[:-1], -1).to(dtype)

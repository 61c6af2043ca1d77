"""Launch-time checks and device helpers shared by hf-cage's Triton kernels (imported lazily, only by
``triton_*`` modules).

On CPU tensors a Triton kernel only runs under the interpreter (``TRITON_INTERPRET=1``, set before
the kernel modules are imported). Outside it we raise rather than fall back, so forcing
``HF_CAGE_BACKEND=triton`` always means the Triton kernels really ran.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .reference import hadamard_matrix


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter."""
    return bool(triton.knobs.runtime.interpret)


def check_device(*tensors: torch.Tensor) -> None:
    """Raise unless every tensor is on CUDA, or all are on CPU under the interpreter."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"Triton kernel inputs must share one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"the Triton backend got {device.type} tensors; run on CUDA, or set TRITON_INTERPRET=1 before "
        "importing hf_cage's kernels to interpret them on CPU, or set HF_CAGE_BACKEND=torch"
    )


@functools.lru_cache(maxsize=64)
def _block_diagonal_hadamard(chunk: int, block: int, device: str) -> torch.Tensor:
    h = hadamard_matrix(block, "cpu")
    return torch.block_diag(*([h] * (chunk // block))).contiguous().to(device)


def block_diagonal_hadamard(chunk: int, block: int, device: torch.device) -> torch.Tensor:
    """``kron(I_{chunk/block}, H_block)``, fp32 ``(chunk, chunk)``: rotates a ``chunk``-wide tile in one ``tl.dot``."""
    return _block_diagonal_hadamard(chunk, block, str(device))


@triton.jit
def round_half_even(v):
    """``torch.round`` of fp32 ``v``: to nearest, ties to even, a zero result keeping ``v``'s sign."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    r = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
    # torch.round keeps the sign of a zero result (-0.3 -> -0.0); v * 0 is a zero with v's sign.
    return tl.where(r == 0.0, v * 0.0, r)

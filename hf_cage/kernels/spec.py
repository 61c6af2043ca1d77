"""What a kernel needs to know about a quantization grid, as one frozen, hashable value.

Every quantizer in hf-cage is "rotate (optionally), pick a scale per row or per group, round to
integer codes, multiply back". The two families differ only in where the grid points sit:

- ``midrise`` (QuEST, CAGE.md section 4): ``2^b`` levels at ``(code + 1/2) * step``, no zero level.
- ``integer``: levels at ``code * step``, the grid of standard int checkpoint formats.

In both, codes lie in ``[-2^(b-1), 2^(b-1) - 1]`` and ``step`` is the stored scale, so a
dequantized value is always ``(code + code_offset) * scale``.

The two FP4 grids (:mod:`hf_cage.kernels.fp4`) are not uniform: ``mxfp4`` and ``nvfp4`` store E2M1
values (``0, 0.5, 1, 1.5, 2, 3, 4, 6`` and their negatives) times one scale per group of 32 / 16 inputs
(an E8M0 power of two / an FP8 E4M3 value divided by an fp32 global scale per tensor). Their bits, group
size and scale rule are the format's (4, 32 or 16, ``"absmax"``); their codes are E2M1 bit patterns.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_BITS = (2, 3, 4, 8)
GRIDS = ("midrise", "integer", "mxfp4", "nvfp4")
FP4_GRIDS = ("mxfp4", "nvfp4")
FP4_GROUP_SIZE = {"mxfp4": 32, "nvfp4": 16}
SCALE_RULES = ("mse", "absmax", "minmax")

# Clip factor (in units of the row RMS) that minimises the MSE of a 2^b-level uniform grid on a
# Gaussian. 2, 3, 4 bits: the QuEST values quoted in CAGE.md; 8 bits: the same criterion solved
# numerically (4M normal samples, 0.005 grid).
GAUSSIAN_MSE_CLIP = {1: 0.7979, 2: 1.4935, 3: 2.0511, 4: 2.5139, 8: 3.91}


@dataclass(frozen=True)
class QuantSpec:
    """One quantization grid.

    Args:
        bits: code width, one of ``SUPPORTED_BITS``.
        grid: ``"midrise"``, ``"integer"``, ``"mxfp4"`` or ``"nvfp4"`` (see module docstring).
        scale_rule: ``"mse"`` clips at ``alpha_b * RMS`` (Gaussian-MSE-optimal), ``"absmax"`` at
            the largest magnitude; ``"minmax"`` is compressed-tensors' dynamic rule (what stock
            loaders and vLLM apply to activations): ``step = absmax / ((2^b - 1) / 2)``, an all-zero
            group gets ``step = eps(fp32)``, codes ``round(clamp(x / step, qmin, qmax))``, so on the
            integer grid the whole code range ``[-2^(b-1), 2^(b-1) - 1]`` is used.
        group_size: inputs sharing one scale along the last dimension; ``None`` = whole row.
        hadamard_block: width of the block-diagonal normalized Hadamard rotation applied to the
            last dimension before quantizing; ``None`` = no rotation.
    """

    bits: int
    grid: str = "midrise"
    scale_rule: str = "mse"
    group_size: int | None = None
    hadamard_block: int | None = None

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; choose one of {SUPPORTED_BITS}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid={self.grid!r} is not supported; choose one of {GRIDS}")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule={self.scale_rule!r} is not supported; choose one of {SCALE_RULES}")
        if self.is_fp4:
            group = FP4_GROUP_SIZE[self.grid]
            if (self.bits, self.group_size, self.scale_rule) != (4, group, "absmax"):
                raise ValueError(
                    f"the {self.grid} grid is bits=4, group_size={group}, scale_rule='absmax'; got bits={self.bits}, "
                    f"group_size={self.group_size}, scale_rule={self.scale_rule!r}"
                )

    @property
    def is_fp4(self) -> bool:
        """True for the FP4 grids (``mxfp4``, ``nvfp4``), which :mod:`hf_cage.kernels.fp4` quantizes."""
        return self.grid in FP4_GRIDS

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def code_offset(self) -> float:
        return 0.5 if self.grid == "midrise" else 0.0

    @property
    def clip_alpha(self) -> float:
        return GAUSSIAN_MSE_CLIP[self.bits]

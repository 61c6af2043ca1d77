"""What a kernel needs to know about a quantization grid, as one frozen, hashable value.

``QuantSpec.grid`` names a registered grid (:mod:`hf_cage.kernels.grid`; the built-in ones are in
:mod:`hf_cage.kernels.grids`), which owns the grid's rules: the uniform grids ``quest`` (mid-rise, levels at
``(code + 1/2) * step``) and ``int`` (levels at ``code * step``), whose codes lie in ``[-2^(b-1), 2^(b-1) - 1]``
so a dequantized value is ``(code + code_offset) * scale``, and the FP4 grids ``mxfp4`` / ``nvfp4`` (E2M1
values times a group scale, :mod:`hf_cage.kernels.fp4`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .grid import Grid, get_grid

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_RULES = ("mse", "absmax", "minmax")

# Clip factor (in units of the row RMS) that minimises the MSE of a 2^b-level uniform grid on a
# Gaussian. 2, 3, 4 bits: the QuEST values quoted in docs/method.md; 8 bits: the same criterion solved
# numerically (4M normal samples, 0.005 grid).
GAUSSIAN_MSE_CLIP = {1: 0.7979, 2: 1.4935, 3: 2.0511, 4: 2.5139, 8: 3.91}


@dataclass(frozen=True)
class QuantSpec:
    """One quantization grid.

    Args:
        bits: code width, one of ``SUPPORTED_BITS``.
        grid: the name of a registered grid (``"quest"``, ``"int"``, ``"mxfp4"``, ``"nvfp4"``, ...); the names
            used before the one vocabulary (``"midrise"``, ``"integer"``) are accepted and stored as the new ones.
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
    grid: str = "quest"
    scale_rule: str = "mse"
    group_size: int | None = None
    hadamard_block: int | None = None

    def __post_init__(self):
        grid = get_grid(self.grid)
        object.__setattr__(self, "grid", grid.name)  # a legacy name becomes the grid's name
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; choose one of {SUPPORTED_BITS}")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule={self.scale_rule!r} is not supported; choose one of {SCALE_RULES}")
        problem = grid.spec_problem(self)
        if problem:
            raise ValueError(problem)

    @property
    def quant_grid(self) -> Grid:
        """The registered :class:`~hf_cage.kernels.grid.Grid` named by ``grid``."""
        return get_grid(self.grid)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def code_offset(self) -> float:
        """``0.5`` on a mid-rise grid (levels at ``(code + 1/2) * step``), else 0."""
        return self.quant_grid.code_offset

    @property
    def clip_alpha(self) -> float:
        return GAUSSIAN_MSE_CLIP[self.bits]

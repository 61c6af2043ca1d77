"""Kernels: quantize / dequantize / fake-quantize / pack / int4 GEMMs, each with a torch twin.

Re-exports only. The dispatching functions live in :mod:`hf_cage.kernels.dispatch` (Triton for CUDA
tensors, or ``HF_CAGE_BACKEND=triton``; the torch twins otherwise), every twin in
:mod:`hf_cage.kernels.reference`, the tile rules in :mod:`hf_cage.kernels.tiles`, the grid registry in
:mod:`hf_cage.kernels.grid` (the built-in grids, registered here, in :mod:`hf_cage.kernels.grids`). Nothing here
imports triton: the ``triton_*`` modules load on the first Triton call.
"""

from __future__ import annotations

from . import dispatch, grids, reference, tiles  # importing grids registers the built-in grids
from .dispatch import (
    BACKEND_ENV,
    LayerKernels,
    backend_for,
    fake_quantize,
    int4_gemm,
    plan_layer,
    quantize_fp4,
    quantize_rows,
    quantize_with_codes,
    triton_module,
    w4a4_matmul,
    w4a16_matmul,
)
from .grid import Grid, get_grid, grid_names, register_grid, registered_grid, unregister_grid
from .packing import pack_int4, unpack_int4
from .reference import (
    dequantize_rows,
    hadamard_rotate,
    int_matmul_reference,
    w4a4_matmul_reference,
    w4a16_matmul_reference,
)
from .spec import GAUSSIAN_MSE_CLIP, SUPPORTED_BITS, QuantSpec
from .tiles import largest_pow2_divisor

__all__ = [
    "BACKEND_ENV",
    "GAUSSIAN_MSE_CLIP",
    "Grid",
    "SUPPORTED_BITS",
    "LayerKernels",
    "QuantSpec",
    "backend_for",
    "dequantize_rows",
    "dispatch",
    "fake_quantize",
    "get_grid",
    "grid_names",
    "grids",
    "hadamard_rotate",
    "int4_gemm",
    "int_matmul_reference",
    "largest_pow2_divisor",
    "pack_int4",
    "plan_layer",
    "quantize_fp4",
    "quantize_rows",
    "quantize_with_codes",
    "reference",
    "register_grid",
    "registered_grid",
    "tiles",
    "triton_module",
    "unpack_int4",
    "unregister_grid",
    "w4a4_matmul",
    "w4a4_matmul_reference",
    "w4a16_matmul",
    "w4a16_matmul_reference",
]

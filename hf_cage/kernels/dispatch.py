"""The seam between hf-cage's maths and its kernels: Triton on CUDA, the torch twins elsewhere.

``HF_CAGE_BACKEND`` picks the backend: ``auto`` (default: Triton for CUDA tensors when triton
is installed, torch otherwise), ``torch`` or ``triton``. Forcing ``triton`` on CPU tensors runs
the real kernels, which only works under ``TRITON_INTERPRET=1``; it never falls back silently.
Triton modules are imported here lazily, on first use, never at ``import hf_cage``.

A quantized layer decides once, when it is built, whether Triton can run it at all
(:func:`plan_layer`: the quantizer layouts and the int4 GEMM tile rules of :mod:`hf_cage.kernels.tiles`).
A layer Triton cannot take runs on the torch twins on every device, and that is logged once per reason;
its calls pass ``backend="torch"`` to the functions below. Every other call follows :func:`backend_for`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

from . import reference, tiles
from .spec import QuantSpec

logger = logging.getLogger("hf_cage.kernels")

BACKEND_ENV = "HF_CAGE_BACKEND"
BACKENDS = ("auto", "torch", "triton")


def requested_backend() -> str:
    backend = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={backend!r} is not supported; choose one of {BACKENDS}")
    return backend


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_for(*tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for an op on ``tensors``, honouring ``HF_CAGE_BACKEND``."""
    backend = requested_backend()
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{BACKEND_ENV}=triton but triton is not installed; pip install triton")
        return "triton"
    if backend == "auto" and all(t.is_cuda for t in tensors) and triton_available():
        return "triton"
    return "torch"


def triton_module(name: str):
    """Import ``hf_cage.kernels.<name>`` (a Triton module) on first use."""
    return importlib.import_module(f"hf_cage.kernels.{name}")


# --- the one eligibility rule and the per-layer plan -------------------------------------------------


def int4_gemm(weight_spec: QuantSpec, activation_spec: QuantSpec | None, in_features: int) -> str | None:
    """Which int4 GEMM a layer with these grids can use: ``"w4a4"`` (4-bit weights and activations, one
    rotation for both), ``"w4a16"`` (4-bit weights, other or no activation quantization), or None (weights
    not 4-bit, or ``in_features`` not a multiple of 8, so they cannot be packed). Grids without integer codes
    (``Grid.integer_codes``, e.g. FP4): None (they dequantize to a float dtype and run ``F.linear``)."""
    if weight_spec.bits != 4 or in_features % 8 or not weight_spec.quant_grid.integer_codes:
        return None
    if (
        activation_spec is not None
        and activation_spec.quant_grid.integer_codes
        and activation_spec.bits == 4
        and activation_spec.hadamard_block == weight_spec.hadamard_block
        and (weight_spec.group_size or tiles.INT8_DOT_K) % tiles.INT8_DOT_K == 0
    ):
        return "w4a4"
    return "w4a16"


@dataclass(frozen=True)
class LayerKernels:
    """What a quantized layer runs on, decided once at build time.

    ``triton``: Triton may run this layer (it then does whenever :func:`backend_for` says so); False means
    the torch twins on every device, for the ``reason`` given. ``gemm``: the int4 GEMM the layer uses on
    Triton (see :func:`int4_gemm`), or None.
    """

    triton: bool
    gemm: str | None
    reason: str | None = None

    def backend(self, *tensors: torch.Tensor) -> str:
        return backend_for(*tensors) if self.triton else "torch"


def plan_layer(
    layer: str,
    in_features: int,
    weight_spec: QuantSpec,
    activation_spec: QuantSpec | None,
    *,
    quantizes_weight: bool,
    gemm: str | None,
) -> LayerKernels:
    """The kernel plan of a layer named ``layer`` (for the log) with these grids: the fused quantizer must
    take its activation rows (and its weight rows when ``quantizes_weight``); ``gemm`` is the int4 GEMM
    the layer would use. A shape Triton cannot take is logged once per distinct reason."""
    specs = [activation_spec] + ([weight_spec] if quantizes_weight else [])
    for spec in specs:
        problem = None if spec is None else spec.quant_grid.triton_problem(in_features, spec)
        if problem:
            reason = f"{layer}(in_features={in_features}): {problem}"
            _log_once(f"{reason}; such layers run on the torch twins on every device")
            return LayerKernels(False, gemm, reason)
    return LayerKernels(True, gemm)


@functools.cache
def _log_once(message: str) -> None:
    logger.warning(message)


# --- dispatching functions (torch twins in reference.py, Triton in triton_*.py) ----------------------


def fake_quantize(
    x: torch.Tensor, spec: QuantSpec, backend: str | None = None, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q(x), straight-through mask)`` by the grid's quantizer (:meth:`hf_cage.kernels.grid.Grid.fake_quantize`;
    uniform grids: :func:`hf_cage.kernels.reference.fake_quantize`, FP4: :func:`hf_cage.kernels.fp4.fake_quantize`;
    ``global_scale``: grids with ``input_global_scale``, ``None`` = the tensor's own)."""
    return spec.quant_grid.fake_quantize(x, spec, backend or backend_for(x), global_scale)


def quantize_fp4(
    x: torch.Tensor, spec: QuantSpec, backend: str | None = None, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """FP4 grids: ``(E2M1 codes, group scales, global scale or None)``; see :func:`hf_cage.kernels.fp4.quantize`."""
    grid = spec.quant_grid
    if not hasattr(grid, "quantize_codes"):
        raise ValueError(f"quantize_fp4 takes the FP4 grids, got grid={spec.grid!r}; use quantize_rows")
    return grid.quantize_codes(x, spec, backend or backend_for(x), global_scale)


def _integer_codes(spec: QuantSpec) -> None:
    if not spec.quant_grid.integer_codes:
        raise ValueError(f"the {spec.grid} grid has no integer codes (Grid.integer_codes); use fake_quantize")


def quantize_rows(x: torch.Tensor, spec: QuantSpec, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 codes, fp32 scales)``; see :func:`hf_cage.kernels.reference.quantize_rows` (integer-code grids)."""
    _integer_codes(spec)
    if (backend or backend_for(x)) == "triton":
        return triton_module("triton_quant").quantize_rows(x, spec)
    return reference.quantize_rows(x, spec)


def quantize_with_codes(
    x: torch.Tensor, spec: QuantSpec, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scales, Q(x), mask)`` in one pass; grids with integer codes."""
    _integer_codes(spec)
    if (backend or backend_for(x)) == "triton":
        return triton_module("triton_quant").quantize(x, spec, codes=True, fake=True)
    return reference.quantize_with_codes(x, spec)


def w4a4_matmul(
    x_codes: torch.Tensor,
    x_scales: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    *,
    x_offset: float = 0.0,
    w_offset: float = 0.0,
    out_dtype: torch.dtype = torch.float32,
    backend: str | None = None,
) -> torch.Tensor:
    """``((Xc + x_offset) s_x) @ ((Wc + w_offset) s_w).T``: int8 codes (M, K) x packed int4 (N, K/8) -> (M, N).

    See :func:`hf_cage.kernels.triton_matmul.w4a4_matmul` for shapes; the twin is
    :func:`hf_cage.kernels.reference.w4a4_matmul_reference`.
    """
    kwargs = dict(x_offset=x_offset, w_offset=w_offset, out_dtype=out_dtype)
    if (backend or backend_for(x_codes, w_packed)) == "triton":
        return triton_module("triton_matmul").w4a4_matmul(x_codes, x_scales, w_packed, w_scales, **kwargs)
    return reference.w4a4_matmul_reference(x_codes, x_scales, w_packed, w_scales, **kwargs)


def w4a16_matmul(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    *,
    w_offset: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """``x @ ((Wc + w_offset) s_w).T``: float ``(M, K)`` x packed int4 ``(N, K/8)`` -> ``(M, N)`` in x's dtype."""
    if (backend or backend_for(x, w_packed)) == "triton":
        return triton_module("triton_matmul").w4a16_matmul(x, w_packed, w_scales, w_offset=w_offset)
    return reference.w4a16_matmul_reference(x, w_packed, w_scales, w_offset=w_offset)


__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "LayerKernels",
    "backend_for",
    "fake_quantize",
    "int4_gemm",
    "plan_layer",
    "quantize_fp4",
    "quantize_rows",
    "quantize_with_codes",
    "requested_backend",
    "triton_available",
    "triton_module",
    "w4a16_matmul",
    "w4a4_matmul",
]

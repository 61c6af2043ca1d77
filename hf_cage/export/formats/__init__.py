"""The export formats, one object each, and the choice between them.

- ``compressed-tensors`` (``pack-quantized``, :mod:`.pack_quantized`): the ``int`` grid, for stock transformers
  and vLLM.
- ``mxfp4-pack-quantized`` / ``nvfp4-pack-quantized`` (:mod:`.fp4`): the FP4 grids, for stock transformers (in
  bfloat16) and vLLM.
- ``hf-cage`` (:mod:`.hf_cage_format`): any 4-bit hf-cage grid, for :func:`hf_cage.load_quantized`.
- ``auto`` (:func:`choose_format`): the compressed-tensors format of the model's grid when it serves the model
  as trained, else hf-cage.
"""

from __future__ import annotations

from ...quant.config import QuantConfig
from ..errors import ExportError
from .base import Conversion, ExportFormat
from .compressed import StockFormat
from .fp4 import Fp4CompressedTensorsFormat
from .hf_cage_format import HfCageFormat
from .pack_quantized import CompressedTensorsFormat

FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        CompressedTensorsFormat(),
        *(Fp4CompressedTensorsFormat(grid) for grid in ("mxfp4", "nvfp4")),
        HfCageFormat(),
    )
}
FORMAT_CHOICES = ("auto", *FORMATS)


def stock_load_dtype(quantization_format: str | None) -> str:
    """The dtype stock transformers loads and computes a checkpoint in, from its ``quantization_config``'s
    ``format`` (``"bfloat16"`` for the FP4 formats, else ``"float32"``)."""
    for fmt in FORMATS.values():
        if isinstance(fmt, StockFormat) and fmt.quantization_format == quantization_format:
            return fmt.load_dtype
    return "float32"


def get_format(name: str) -> ExportFormat:
    """The format called ``name``; raises :class:`ExportError` naming the choices for any other name."""
    if name not in FORMATS:
        raise ExportError(f"unknown format {name!r}; choose one of {', '.join(FORMAT_CHOICES)}")
    return FORMATS[name]


def stock_format_for(config: QuantConfig) -> ExportFormat:
    """The compressed-tensors format that holds the model's grid (``Grid.stock_format``: ``{mx,nv}fp4-pack-quantized``
    or ``pack-quantized``); ``pack-quantized`` for a grid none holds (its :meth:`~ExportFormat.problem` says why)."""
    return FORMATS.get(config.quant_grid.stock_format, FORMATS["compressed-tensors"])


def choose_format(config: QuantConfig, *, weights_only: bool = False) -> tuple[ExportFormat, str | None]:
    """``auto``: the compressed-tensors format of the model's grid when it serves the model as trained, else
    hf-cage with the reason why.

    Raises:
        ExportError: neither format holds the model without loss.
    """
    ct, hf = stock_format_for(config), FORMATS["hf-cage"]
    why = ct.problem(config, weights_only=weights_only)
    convertible = why is None  # --allow-lossy can only convert what the stock format holds at all
    if convertible:
        conversion = ct.conversion(config, weights_only=weights_only)
        if not conversion.lossy:
            return ct, None
        why = conversion.why
    if hf.problem(config, weights_only=weights_only) is None:
        return hf, (
            f"format auto: hf-cage, because {why}; load it with hf_cage.load_quantized(path) "
            f"(--format {ct.name} --allow-lossy converts it for stock loaders, with the difference printed)"
        )
    advice = (
        f"pass --format {ct.name} --allow-lossy to convert it and print the measured difference"
        if convertible
        else "no packed format holds it; the training checkpoint itself loads with hf_cage.load_qat_model(path)"
    )
    raise ExportError(
        f"no format serves this model as trained: {why}; {hf.problem(config, weights_only=weights_only)}; {advice}"
    )


def resolve_format(
    name: str, config: QuantConfig, *, weights_only: bool = False, allow_lossy: bool = False
) -> tuple[ExportFormat, Conversion, str | None]:
    """``(format, conversion, note)`` for ``--format name`` (``auto`` or a format name); raises ExportError."""
    note = None
    if name == "auto":
        fmt, note = choose_format(config, weights_only=weights_only)
    else:
        fmt = get_format(name)
    return fmt, fmt.check(config, weights_only=weights_only, allow_lossy=allow_lossy), note


__all__ = [
    "FORMATS",
    "FORMAT_CHOICES",
    "CompressedTensorsFormat",
    "Conversion",
    "ExportFormat",
    "Fp4CompressedTensorsFormat",
    "HfCageFormat",
    "StockFormat",
    "choose_format",
    "get_format",
    "resolve_format",
    "stock_format_for",
    "stock_load_dtype",
]

"""Which quantized models each export format can hold, and the metadata each writes into ``config.json``.

- ``compressed-tensors`` (``pack-quantized``): the format transformers and vLLM load. It holds the
  ``int`` quantizer's integer grid (``code * scale``) without rotation, 4 or 8 bits, per channel or
  per group. Its ``quantization_config`` is what transformers reads to rebuild the packed layers.
- ``hf-cage``: the same tensors plus hf-cage's own metadata, for any grid hf-cage trains (the QuEST
  mid-rise grid ``(code + 1/2) * scale``, Hadamard rotations); loaded by :func:`hf_cage.load_quantized`.

Both keep the model's :class:`~hf_cage.QuantConfig` under ``hf_cage_quantization`` and describe the
export under :data:`EXPORT_KEY`.
"""

from __future__ import annotations

from dataclasses import replace

from ..quant.config import QuantConfig
from .errors import ExportError

FORMATS = ("compressed-tensors", "hf-cage")
EXPORT_KEY = "hf_cage_export"
FORMAT_VERSION = 1
COMPRESSED_TENSORS_BITS = (4, 8)
HF_CAGE_BITS = (4,)
PACKING = "pack-quantized: code + 2^(bits-1), 32/bits codes per int32 along inputs, lowest bits first"


def check_format(config: QuantConfig, fmt: str, *, weights_only: bool = False, allow_lossy: bool = False) -> bool:
    """Raise :class:`ExportError` if ``fmt`` cannot hold a model quantized with ``config``.

    Returns True when the export is a lossy conversion (only with ``allow_lossy``), else False.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "hf-cage":
        if config.w_bits not in HF_CAGE_BITS:
            raise ExportError(
                f"--format hf-cage holds {HF_CAGE_BITS} -bit weights (hf_cage.Int4Linear), the model has "
                f"w_bits={config.w_bits}; for 8-bit int weights use --format compressed-tensors"
            )
        return False
    if config.w_bits not in COMPRESSED_TENSORS_BITS:
        raise ExportError(
            f"w_bits={config.w_bits} cannot be exported: --format compressed-tensors holds "
            f"{' or '.join(map(str, COMPRESSED_TENSORS_BITS))}-bit weights"
        )
    if not weights_only and config.a_bits is not None and config.a_bits not in COMPRESSED_TENSORS_BITS:
        raise ExportError(
            f"a_bits={config.a_bits}: compressed-tensors only declares 4- or 8-bit dynamic activations; "
            "pass --weights-only to export the weights alone, or use --format hf-cage"
        )
    lossless = config.quantizer == "int" and not config.hadamard
    if lossless:
        return False
    what = "the QuEST mid-rise grid" if config.quantizer == "quest" else "a Hadamard rotation"
    if config.quantizer == "quest" and config.hadamard:
        what += " and a Hadamard rotation"
    if not allow_lossy:
        raise ExportError(
            f"compressed-tensors cannot hold {what} losslessly (quantizer={config.quantizer!r}, "
            f"hadamard={config.hadamard}); use --format hf-cage for a lossless export, "
            "or --allow-lossy to re-quantize to the int grid and see the measured error"
        )
    return True


def lossy_target_config(config: QuantConfig) -> QuantConfig:
    """The ``int`` grid (absmax, no rotation, same bits and groups) a lossy conversion re-quantizes ``Q(W)`` to."""
    return replace(config, quantizer="int", hadamard=False, clip="absmax")


def compressed_tensors_config(config: QuantConfig, ignore: list[str], *, weights_only: bool = False) -> dict:
    """``quantization_config`` of a ``pack-quantized`` checkpoint, as ``compressed-tensors`` writes it.

    One config group targets every ``Linear`` but those in ``ignore`` (the linears left dense:
    ``lm_head`` for the default targets). Activations are declared (per-token, dynamic, symmetric)
    when the model was trained with quantized activations, unless ``weights_only``.
    """
    weights = {
        "num_bits": config.w_bits,
        "type": "int",
        "symmetric": True,
        "strategy": config.granularity,
        "group_size": config.group_size if config.granularity == "group" else None,
        "dynamic": False,
    }
    activations = None
    if config.a_bits is not None and not weights_only:
        activations = {
            "num_bits": config.a_bits,
            "type": "int",
            "symmetric": True,
            "strategy": "token",
            "group_size": None,
            "dynamic": True,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": activations,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": _compressed_tensors_version(),
    }


def export_metadata(config: QuantConfig, fmt: str, *, weights_only: bool, lossy_from: QuantConfig | None) -> dict:
    """hf-cage's description of the export (stored under :data:`EXPORT_KEY`)."""
    from .. import __version__

    spec = config.weight_spec(config.group_size or 128)
    data = {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "hf_cage_version": __version__,
        "weight_grid": spec.grid,
        "code_offset": spec.code_offset,
        "hadamard": bool(config.hadamard),
        "hadamard_max_block": 128 if config.hadamard else None,
        "packing": PACKING,
        "weights_only": weights_only,
    }
    if lossy_from is not None:
        data["lossy_conversion_from"] = lossy_from.to_dict()
    return data


def _compressed_tensors_version() -> str:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:  # the version string is informative only
        return "unknown"

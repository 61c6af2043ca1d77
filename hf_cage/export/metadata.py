"""An export's ``config.json``: the model's config, the stored :class:`~hf_cage.QuantConfig` under
:data:`~hf_cage.qat.CONFIG_KEY`, hf-cage's description of the export under :data:`~hf_cage.qat.EXPORT_KEY`, and
the format's ``quantization_config`` (when it has one)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..qat import CONFIG_KEY, EXPORT_KEY
from ..quant.config import QuantConfig
from ..version import __version__
from .formats import Conversion, ExportFormat

FORMAT_VERSION = 2


def export_metadata(
    config: QuantConfig, fmt: ExportFormat, *, weights_only: bool, lossy_from: QuantConfig | None, parity: dict
) -> dict:
    """hf-cage's description of the export (stored under :data:`hf_cage.qat.EXPORT_KEY`)."""
    spec, grid = config.weight_spec(config.group_size or 128), config.quant_grid
    data = {
        "format": fmt.name,
        "format_version": FORMAT_VERSION,
        "hf_cage_version": __version__,
        "weight_grid": grid.legacy_name or grid.name,  # the name exports have always carried
        "code_offset": spec.code_offset,
        "hadamard": bool(config.hadamard),
        "hadamard_max_block": 128 if config.hadamard else None,
        "packing": grid.packing,
        "weights_only": weights_only,
        "parity": parity,
    }
    if lossy_from is not None:
        data["lossy_conversion_from"] = lossy_from.to_dict()
    return data


def write_config(
    model: nn.Module,
    folder: Path,
    fmt: ExportFormat,
    exported_config: QuantConfig,
    trained_config: QuantConfig,
    conversion: Conversion,
    *,
    weights_only: bool,
    dtype: str,
    quantized: set[str],
    parity: dict,
) -> None:
    """Write ``folder/config.json`` for ``model`` exported in ``fmt``; ``quantized``: the packed linears' names
    (every other ``nn.Linear`` is listed in the ``quantization_config``'s ``ignore``)."""
    data = json.loads(model.config.to_json_string(use_diff=False))
    data.pop("quantization_config", None)
    data["dtype"] = dtype
    if not data.get("architectures"):
        data["architectures"] = [type(model).__name__]
    data[CONFIG_KEY] = exported_config.to_dict()
    data[EXPORT_KEY] = export_metadata(
        exported_config,
        fmt,
        weights_only=weights_only,
        lossy_from=trained_config if conversion.lossy else None,
        parity=parity,
    )
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    quantization_config = fmt.quantization_config(exported_config, ignore, weights_only=weights_only)
    if quantization_config is not None:
        data["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

"""hf-cage: CAGE quantization-aware training for Llama models in the Hugging Face stack.

Public API only; importing this package never imports triton or touches CUDA. Every name is loaded on first
use (``import hf_cage`` itself imports nothing heavy), so the ``hf-cage`` command starts inside its own error
handling: a Ctrl-C while torch is being imported is an exit code, not a traceback.
"""

from typing import TYPE_CHECKING

from .version import __version__ as __version__

# Public name -> the module that defines it, imported on first use.
_PUBLIC = {
    **dict.fromkeys(("ExportError", "export_checkpoint", "export_model", "load_quantized"), "hf_cage.export"),
    "QuantSpec": "hf_cage.kernels.spec",
    **dict.fromkeys(("Fp4Linear", "Int4Linear", "QATLinear"), "hf_cage.layers"),
    **dict.fromkeys(
        ("CAGE", "CAGECorrection", "cage_lambda", "create_cage_optimizer", "weight_quantizers_of"), "hf_cage.optim"
    ),
    **dict.fromkeys(("load_qat_model", "quant_config_of", "quantize_model", "quantized_layers"), "hf_cage.qat"),
    "QuantConfig": "hf_cage.quant",
}
# The trainer imports transformers.Trainer (slow). TRL's trainers live in ``hf_cage.trl`` (imports trl, an optional
# extra), never imported by ``import hf_cage``.
_LAZY = {name: "hf_cage.trainer" for name in ("CAGEArguments", "CAGEConfig", "CAGETrainer", "CAGETrainerMixin")}

if TYPE_CHECKING:
    from .export import ExportError, export_checkpoint, export_model, load_quantized
    from .kernels.spec import QuantSpec
    from .layers import Fp4Linear, Int4Linear, QATLinear
    from .optim import CAGE, CAGECorrection, cage_lambda, create_cage_optimizer, weight_quantizers_of
    from .qat import load_qat_model, quant_config_of, quantize_model, quantized_layers
    from .quant import QuantConfig
    from .trainer import CAGEArguments, CAGEConfig, CAGETrainer, CAGETrainerMixin


def __getattr__(name: str):
    import importlib

    module = _PUBLIC.get(name) or _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    try:  # a subpackage not imported yet (``hf_cage.kernels``)
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'hf_cage' has no attribute {name!r}")


__all__ = [
    "CAGE",
    "CAGEArguments",
    "CAGEConfig",
    "CAGECorrection",
    "CAGETrainer",
    "CAGETrainerMixin",
    "ExportError",
    "Fp4Linear",
    "Int4Linear",
    "QATLinear",
    "QuantConfig",
    "QuantSpec",
    "cage_lambda",
    "create_cage_optimizer",
    "export_checkpoint",
    "export_model",
    "load_qat_model",
    "load_quantized",
    "quant_config_of",
    "quantize_model",
    "quantized_layers",
    "weight_quantizers_of",
]

"""hf-cage: CAGE quantization-aware training for Llama models in the Hugging Face stack.

Public API only; importing this package never imports triton or touches CUDA.
"""

from .export import ExportError, export_checkpoint, export_model, load_quantized
from .kernels.spec import QuantSpec
from .layers import Fp4Linear, Int4Linear, QATLinear
from .optim import CAGE, CAGECorrection, cage_lambda, create_cage_optimizer, weight_quantizers_of
from .qat import load_qat_model, quant_config_of, quantize_model, quantized_layers
from .quant import QuantConfig

__version__ = "0.1.0"

# The trainer imports transformers.Trainer (slow): loaded on first use, not at ``import hf_cage``. TRL's trainers
# live in ``hf_cage.trl`` (imports trl, an optional extra), never imported by ``import hf_cage``.
_LAZY = {name: "hf_cage.trainer" for name in ("CAGEArguments", "CAGEConfig", "CAGETrainer", "CAGETrainerMixin")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
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

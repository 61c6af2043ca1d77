"""hf-cage: CAGE quantization-aware training for Llama models in the Hugging Face stack.

Public API only; importing this package never imports triton or touches CUDA.
"""

from .export import ExportError, export_model, load_quantized
from .kernels.spec import QuantSpec
from .layers import Int4Linear, QATLinear
from .optim import CAGE, CAGECorrection, cage_lambda, create_cage_optimizer, weight_quantizers_of
from .qat import load_qat_model, quant_config_of, quantize_model, quantized_layers
from .quant import QuantConfig

__version__ = "0.1.0"

__all__ = [
    "CAGE",
    "CAGECorrection",
    "ExportError",
    "Int4Linear",
    "QATLinear",
    "QuantConfig",
    "QuantSpec",
    "cage_lambda",
    "create_cage_optimizer",
    "export_model",
    "load_qat_model",
    "load_quantized",
    "quant_config_of",
    "quantize_model",
    "quantized_layers",
    "weight_quantizers_of",
]

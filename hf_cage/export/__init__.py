"""Export trained QAT models as packed checkpoints (compressed-tensors or hf-cage), load them, publish them."""

from .api import ExportResult, export_model
from .card import CardOptions
from .errors import ExportError, PushError
from .formats import FORMATS
from .hub import push_folder, resolve_token
from .load import load_quantized
from .source import TrainingInfo, load_checkpoint

__all__ = [
    "FORMATS",
    "CardOptions",
    "ExportError",
    "ExportResult",
    "PushError",
    "TrainingInfo",
    "export_model",
    "load_checkpoint",
    "load_quantized",
    "push_folder",
    "resolve_token",
]

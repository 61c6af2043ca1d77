"""Export trained QAT models as packed checkpoints (compressed-tensors or hf-cage), load them, publish them."""

from .api import DEFAULT_MAX_SHARD_SIZE, ExportResult, export_checkpoint, export_model
from .card import CardOptions
from .errors import ExportError, ExportWriteError, PushError
from .formats import FORMAT_CHOICES, FORMATS, ExportFormat, choose_format
from .hub import push_folder, resolve_token
from .load import load_quantized
from .source import TrainingInfo, load_checkpoint

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "FORMATS",
    "FORMAT_CHOICES",
    "CardOptions",
    "ExportError",
    "ExportFormat",
    "ExportResult",
    "ExportWriteError",
    "PushError",
    "TrainingInfo",
    "choose_format",
    "export_checkpoint",
    "export_model",
    "load_checkpoint",
    "load_quantized",
    "push_folder",
    "resolve_token",
]

"""Export trained QAT models as packed checkpoints (compressed-tensors or hf-cage), load them, publish them."""

from .api import ExportResult, export_checkpoint, export_model
from .card import CardOptions
from .errors import ExportError, ExportWriteError, PushError
from .formats import FORMAT_CHOICES, FORMATS, ExportFormat, choose_format
from .hub import push_folder, resolve_token
from .load import load_quantized
from .options import DEFAULT_MAX_SHARD_SIZE, ExportOptions
from .source import TrainingInfo, load_checkpoint

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "FORMATS",
    "FORMAT_CHOICES",
    "CardOptions",
    "ExportError",
    "ExportFormat",
    "ExportOptions",
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

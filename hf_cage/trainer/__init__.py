"""``CAGEConfig(TrainingArguments)`` and ``CAGETrainer(Trainer)``: CAGE in the Hugging Face Trainer."""

from .config import CAGEConfig
from .metrics import quantization_metrics
from .trainer import CAGETrainer

__all__ = ["CAGEConfig", "CAGETrainer", "quantization_metrics"]

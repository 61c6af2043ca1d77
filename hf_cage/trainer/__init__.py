"""CAGE in the Hugging Face Trainer: ``CAGEArguments`` and ``CAGETrainerMixin`` for any Trainer subclass,
``CAGEConfig(TrainingArguments)`` and ``CAGETrainer(Trainer)`` ready made."""

from .config import CAGEArguments, CAGEConfig
from .metrics import quantization_metrics
from .mixin import CAGETrainerMixin
from .trainer import CAGETrainer

__all__ = ["CAGEArguments", "CAGEConfig", "CAGETrainer", "CAGETrainerMixin", "quantization_metrics"]

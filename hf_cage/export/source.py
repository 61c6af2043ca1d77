"""Read an export's input: a QAT model directory or Trainer checkpoint, and what training left beside it.

A directory saved by ``save_pretrained`` / ``CAGETrainer.save_model`` holds ``config.json`` (with
``hf_cage_quantization``) and the dense weights; a Trainer ``checkpoint-N/`` adds optimizer state and
``trainer_state.json`` (``log_history``: the loss curve). Tokenizer files, ``generation_config.json``,
``trainer_state.json`` and the recipes' ``metrics.json`` are looked up in the directory, then its parent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..qat import CONFIG_KEY
from ..quant.config import QuantConfig
from .errors import ExportError

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


@dataclass
class TrainingInfo:
    """What training left beside a checkpoint; every field may be missing."""

    metrics: dict = field(default_factory=dict)
    log_history: list[dict] = field(default_factory=list)
    tokenizer_files: list[Path] = field(default_factory=list)
    generation_config: Path | None = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike | None) -> TrainingInfo:
        """Collect training info from ``path`` and its parent (missing or unreadable files are skipped)."""
        if path is None:
            return cls()
        path = Path(path)
        places = [path, path.parent]
        metrics = _first_json(places, "metrics.json")
        state = _first_json(places, "trainer_state.json")
        tokenizer_dir = next((p for p in places if (p / "tokenizer_config.json").is_file()), None)
        tokenizer_files = [
            tokenizer_dir / f for f in TOKENIZER_FILES if tokenizer_dir and (tokenizer_dir / f).is_file()
        ]
        generation = next(
            (p / "generation_config.json" for p in places if (p / "generation_config.json").is_file()), None
        )
        history = state.get("log_history", []) if isinstance(state, dict) else []
        return cls(
            metrics=metrics if isinstance(metrics, dict) else {},
            log_history=[h for h in history if isinstance(h, dict)],
            tokenizer_files=tokenizer_files,
            generation_config=generation,
        )


def _first_json(places: list[Path], name: str):
    for place in places:
        file = place / name
        if file.is_file():
            try:
                return json.loads(file.read_text())
            except (OSError, ValueError):
                return None
    return None


def check_checkpoint_dir(path: str | os.PathLike) -> QuantConfig:
    """Validate a QAT checkpoint directory without loading weights; returns its :class:`~hf_cage.QuantConfig`.

    Raises:
        ExportError: the directory, its ``config.json``, its weights or its hf-cage config is missing
            or malformed.
    """
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"checkpoint {str(path)!r} not found: pass the directory written by save_pretrained")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{str(path)!r} has no config.json: it is not a saved model or Trainer checkpoint")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{config_file} is malformed ({err}); re-save the model with save_pretrained") from None
    if not isinstance(config, dict):
        raise ExportError(f"{config_file} is malformed (not a JSON object); re-save the model with save_pretrained")
    if CONFIG_KEY not in config:
        raise ExportError(
            f"{str(path)!r} has no quantized layers (config.json has no {CONFIG_KEY!r}); "
            "export needs a model quantized with hf_cage.quantize_model and saved with save_pretrained"
        )
    try:
        quant_config = QuantConfig.from_dict(config[CONFIG_KEY])
    except (TypeError, ValueError) as err:
        raise ExportError(f"{config_file} has a malformed {CONFIG_KEY!r}: {err}") from None
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ExportError(f"{str(path)!r} has no weights (none of {', '.join(WEIGHT_FILES)})")
    return quant_config


def load_checkpoint(path: str | os.PathLike, progress: bool = True):
    """Load the QAT model saved in ``path`` (fp32, so ``Q(W)`` is computed from exact weights)."""
    import torch
    from transformers.utils import logging as hf_logging

    from ..qat import load_qat_model

    check_checkpoint_dir(path)
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        return load_qat_model(path, dtype=torch.float32)
    except Exception as err:  # any loading failure is a malformed checkpoint for the user
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise ExportError(f"could not load the checkpoint {str(path)!r}: {reason}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()

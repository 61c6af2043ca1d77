"""Read an export's input: a QAT model directory or Trainer checkpoint, and what training left beside it.

A directory saved by ``save_pretrained`` / ``CAGETrainer.save_model`` holds ``config.json`` (with
``hf_cage_quantization``) and the dense weights; a Trainer ``checkpoint-N/`` adds optimizer state and
``trainer_state.json`` (``log_history``: the loss curve); a recipe run folder holds ``metrics.json`` and
``log_history.json``. See :meth:`TrainingInfo.from_dir` for what is read from where.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..qat import CONFIG_KEY, CheckpointError, read_model_config
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


# Settings of the whole run: true of every checkpoint of it, so they may come from the run folder's metrics.json.
RUN_SETTINGS = (
    "method", "w_bits", "a_bits", "quantizer", "cage_lambda", "cage_silence_ratio", "dataset", "base_model"
)  # fmt: skip


@dataclass
class TrainingInfo:
    """What training left beside a checkpoint; every field may be missing."""

    metrics: dict = field(default_factory=dict)
    log_history: list[dict] = field(default_factory=list)
    tokenizer_files: list[Path] = field(default_factory=list)
    generation_config: Path | None = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike | None) -> TrainingInfo:
        """Collect what describes the checkpoint in ``path`` (missing or unreadable files are skipped).

        Results (steps, losses, the loss curve) come only from ``path`` itself: its ``metrics.json``, its
        Trainer ``trainer_state.json`` (a ``checkpoint-N`` folder: ``global_step``, the last logged losses)
        or the recipes' ``log_history.json``. The run folder above a ``checkpoint-N`` describes the final
        model, so only run settings (method, bits, CAGE lambda, ...), the tokenizer and the generation
        config are taken from it.
        """
        if path is None:
            return cls()
        path = Path(path)
        places = [path, path.parent]
        own = _read_json(path / "metrics.json")
        state = _read_json(path / "trainer_state.json")
        history = state.get("log_history") if isinstance(state, dict) else _read_json(path / "log_history.json")
        history = [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []
        if isinstance(own, dict):
            metrics = own
        else:
            parent = _read_json(path.parent / "metrics.json")
            metrics = {k: parent[k] for k in RUN_SETTINGS if isinstance(parent, dict) and k in parent}
            metrics.update(_results_from_history(state, history))
        tokenizer_dir = next((p for p in places if (p / "tokenizer_config.json").is_file()), None)
        tokenizer_files = [
            tokenizer_dir / f for f in TOKENIZER_FILES if tokenizer_dir and (tokenizer_dir / f).is_file()
        ]
        generation = next(
            (p / "generation_config.json" for p in places if (p / "generation_config.json").is_file()), None
        )
        return cls(
            metrics=metrics,
            log_history=history,
            tokenizer_files=tokenizer_files,
            generation_config=generation,
        )


def _results_from_history(state, history: list[dict]) -> dict:
    """Steps and the last logged train / eval loss of a checkpoint, from its own Trainer state."""
    results = {}
    step = state.get("global_step") if isinstance(state, dict) else None
    if step is None and history:
        step = max((h["step"] for h in history if isinstance(h.get("step"), int)), default=None)
    if step is not None:
        results["steps"] = step
    for key, name in (("loss", "train_loss"), ("eval_loss", "eval_loss")):
        values = [h[key] for h in history if isinstance(h.get(key), (int, float))]
        if values:
            results[name] = values[-1]
    return results


def _read_json(file: Path):
    if file.is_file():
        try:
            return json.loads(file.read_text())
        except (OSError, ValueError):
            return None
    return None


def checkpoint_dtype(path: str | os.PathLike) -> str | None:
    """The dtype the checkpoint's weights are stored in (``config.json``'s ``dtype``), or ``None``."""
    config = _read_json(Path(path) / "config.json")
    if not isinstance(config, dict):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return value if isinstance(value, str) else None


def check_checkpoint_dir(path: str | os.PathLike) -> QuantConfig:
    """Validate a QAT checkpoint directory without loading weights; returns its :class:`~hf_cage.QuantConfig`.

    Raises:
        ExportError: the directory, its ``config.json``, its weights or its hf-cage config is missing
            or malformed.
    """
    path = Path(path)
    config_file = path / "config.json"
    try:
        config = read_model_config(path)
    except (FileNotFoundError, CheckpointError) as err:
        raise ExportError(str(err)) from None
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
    """Load the QAT model saved in ``path`` (fp32, so ``Q(W)`` is computed from exact weights), strictly
    (:func:`hf_cage.qat.load_pretrained`), and check that every tensor of the loaded model equals the one on
    disk, so that what an export measures and packs is the model that was saved.

    Raises:
        ExportError: the checkpoint is malformed, incomplete, or does not load to its saved weights.
    """
    import torch
    from transformers.utils import logging as hf_logging

    from ..qat import load_qat_model

    check_checkpoint_dir(path)
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = load_qat_model(path, dtype=torch.float32)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    except Exception as err:  # any loading failure is a malformed checkpoint for the user
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise ExportError(f"could not load the checkpoint {str(path)!r}: {reason}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    _check_against_files(model, Path(path))
    return model


def _check_against_files(model, path: Path) -> None:
    """Every tensor saved in ``path`` equals the loaded model's tensor of that name (upcast exactly to fp32)."""
    import torch
    from safetensors import safe_open

    state = model.state_dict()
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        files = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        return  # pytorch_model.bin: loaded by transformers' own code, checked by its loading report only
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                saved = f.get_tensor(key)
                loaded = state.get(key)
                if loaded is None or not torch.equal(saved.to(loaded.dtype), loaded):
                    raise ExportError(
                        f"the model loaded from {str(path)!r} differs from its saved tensor {key!r}; the export "
                        "would not be the model that was saved: re-save the checkpoint"
                    )

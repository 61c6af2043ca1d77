"""``export_model``: write a trained QAT model as a packed checkpoint with its model card.

Everything is checked before anything is written; the files are written into a hidden temporary
directory beside ``output_dir`` and renamed into place at the end, so an interrupted or failed export
leaves ``output_dir`` as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..kernels.packing import pack_codes
from ..qat import CONFIG_KEY, quant_config_of, quantized_layers
from .card import CardOptions, build_model_card, plot_loss_curve
from .errors import ExportError
from .formats import EXPORT_KEY, check_format, compressed_tensors_config, export_metadata, lossy_target_config
from .lossy import logit_difference, requantize, sample_batch
from .pack import layer_problem, pack_layer
from .source import TrainingInfo

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
WEIGHTS_NAME = "model.safetensors"
LOSS_CURVE = "loss_curve.png"


@dataclass
class ExportResult:
    """What an export wrote. Sizes count the weight files; ``bf16_size_bytes`` is the dense model in bf16."""

    output_dir: Path
    format: str
    num_layers: int
    size_bytes: int
    bf16_size_bytes: int
    files: list[str] = field(default_factory=list)
    lossy: dict | None = None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a file, or a non-empty directory unless ``overwrite``; returns the path."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"output path {str(output_dir)!r} is a file; pass a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ExportError(f"output directory {str(output_dir)!r} is not empty; pass --overwrite to replace it")
    return output_dir


def export_model(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    format: str = "compressed-tensors",
    weights_only: bool = False,
    allow_lossy: bool = False,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    training: TrainingInfo | None = None,
    card: CardOptions | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = _stderr,
) -> ExportResult:
    """Export a model quantized with :func:`hf_cage.quantize_model` (after training) to ``output_dir``.

    Args:
        model: a transformers causal LM whose target linears are ``QATLinear``.
        format: ``"compressed-tensors"`` (loads in transformers / vLLM; int quantizer only) or
            ``"hf-cage"`` (any hf-cage grid, loads with :func:`hf_cage.load_quantized`).
        weights_only: do not declare activation quantization in the compressed-tensors config.
        allow_lossy: let compressed-tensors re-quantize a QuEST / Hadamard model to the int grid;
            the measured weight error and logit difference are logged and put in the card.
        dtype: dtype of the tensors left dense (embeddings, norms, ``lm_head``, biases).
        overwrite: replace a non-empty ``output_dir``.
        training: metrics / logs / tokenizer found beside the checkpoint (see ``TrainingInfo.from_dir``).
        card: metadata for the model card.
    Raises:
        ExportError: the model or options cannot be exported; nothing was written.
    """
    output_dir = check_output_dir(output_dir, overwrite)
    layers = list(quantized_layers(model))
    config = quant_config_of(model)
    if not layers or config is None:
        raise ExportError("the model has no quantized layers; quantize it with hf_cage.quantize_model and train it")
    lossy = check_format(config, format, weights_only=weights_only, allow_lossy=allow_lossy)
    problems = [p for p in (layer_problem(name, layer) for name, layer in layers) if p]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ExportError(f"cannot pack this model: {'; '.join(problems[:3])}{more}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    training = training or TrainingInfo()
    card = card or CardOptions()
    exported_config = lossy_target_config(config) if lossy else config

    tensors, bf16_bytes, lossy_report = _collect_tensors(
        model, layers, exported_config, lossy, DTYPES[dtype], progress
    )
    if lossy_report and log:
        log(
            "lossy conversion to the int grid: relative weight error {weight_rel_error:.4g}, logit difference "
            "on a sample batch max {logit_max_abs_diff:.4g} mean {logit_mean_abs_diff:.4g}".format(**lossy_report)
        )

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        from safetensors.torch import save_file

        save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        size = (staging / WEIGHTS_NAME).stat().st_size
        _write_config(model, staging, exported_config, format, weights_only, dtype, lossy, config, layers)
        _copy_side_files(model, staging, training)
        curve = LOSS_CURVE if plot_loss_curve(training.log_history, staging / LOSS_CURVE) else None
        model_card = build_model_card(
            exported_config,
            format,
            num_layers=len(layers),
            dense_dtype=dtype,
            size_bytes=size,
            bf16_size_bytes=bf16_bytes,
            training=training,
            options=card,
            weights_only=weights_only,
            lossy=lossy_report,
            loss_curve=curve,
        )
        model_card.save(staging / "README.md")
        _move_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(
        output_dir=output_dir,
        format=format,
        num_layers=len(layers),
        size_bytes=size,
        bf16_size_bytes=bf16_bytes,
        files=sorted(p.name for p in output_dir.iterdir()),
        lossy=lossy_report,
    )


@torch.no_grad()
def _collect_tensors(model, layers, exported_config, lossy: bool, dense_dtype: torch.dtype, progress: bool):
    """The checkpoint's tensors (packed layers + dense rest), the bf16 size of the dense model, the lossy report."""
    from tqdm.auto import tqdm

    state = model.state_dict()
    packed_weights = {f"{name}.weight" for name, _ in layers}
    bf16_bytes, seen = 0, set()
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ptr in seen:  # tied weights (e.g. lm_head sharing embed_tokens) are stored once
            continue
        seen.add(ptr)
        bf16_bytes += value.numel() * (2 if value.is_floating_point() else value.element_size())
        if key not in packed_weights:
            tensors[key] = value.to(dense_dtype) if value.is_floating_point() else value
    reference, converted, err_sq, ref_sq = {}, {}, 0.0, 0.0
    for name, layer in tqdm(layers, desc="packing layers", unit="layer", disable=not progress):
        if lossy:
            trained_q = layer.weight_quantizer().float()
            spec = exported_config.weight_spec(layer.in_features)
            codes, scales, deq = requantize(trained_q, spec)
            packed = {
                "weight_packed": pack_codes(codes, spec.bits).cpu(),
                "weight_scale": scales.contiguous().cpu(),
                "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
            }
            reference[name], converted[name] = trained_q, deq
            err_sq += (deq - trained_q).square().sum().item()
            ref_sq += trained_q.square().sum().item()
        else:
            packed = pack_layer(layer)
        for suffix, tensor in packed.items():
            tensors[f"{name}.{suffix}"] = tensor
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    report = None
    if lossy:
        max_diff, mean_diff = logit_difference(model, reference, converted, sample_batch(model))
        report = {
            "weight_rel_error": (err_sq / max(ref_sq, 1e-30)) ** 0.5,
            "logit_max_abs_diff": max_diff,
            "logit_mean_abs_diff": mean_diff,
        }
    return tensors, bf16_bytes, report


def _write_config(model, staging: Path, exported_config, fmt, weights_only, dtype, lossy, trained_config, layers):
    data = json.loads(model.config.to_json_string(use_diff=False))
    data.pop("quantization_config", None)
    data["dtype"] = dtype
    if not data.get("architectures"):
        data["architectures"] = [type(model).__name__]
    data[CONFIG_KEY] = exported_config.to_dict()
    data[EXPORT_KEY] = export_metadata(
        exported_config, fmt, weights_only=weights_only, lossy_from=trained_config if lossy else None
    )
    if fmt == "compressed-tensors":
        quantized = {name for name, _ in layers}
        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
        data["quantization_config"] = compressed_tensors_config(exported_config, ignore, weights_only=weights_only)
    (staging / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _copy_side_files(model, staging: Path, training: TrainingInfo) -> None:
    for file in training.tokenizer_files:
        shutil.copy2(file, staging / file.name)
    if training.generation_config is not None:
        shutil.copy2(training.generation_config, staging / "generation_config.json")
    elif getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename ``staging`` to ``output_dir``, replacing whatever was there (already checked)."""
    if output_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        os.rename(output_dir, old / "previous")
        os.rename(staging, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, output_dir)

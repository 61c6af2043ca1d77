"""``export_model`` (a model in memory) and ``export_checkpoint`` (a checkpoint on disk): packed checkpoints.

Everything is checked before anything is written; the folder is written through
:func:`~hf_cage.export.staging.staged_folder`, so a failed or interrupted export leaves ``output_dir`` as it was.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..layers.packed import pack_weight, packing_problem, unpack_weight
from ..qat import quant_config_of, quantized_layers
from . import hub
from .card import CardOptions, build_model_card, plot_loss_curve
from .errors import ExportError, PushError
from .formats import Conversion, ExportFormat, resolve_format
from .metadata import write_config
from .options import DTYPE_CHOICES, DTYPES, ExportOptions
from .parity import measure_parity
from .source import TrainingInfo, check_checkpoint_dir, checkpoint_dtype, load_checkpoint
from .staging import as_os_error, check_output_dir, staged_folder

WEIGHTS_PATTERN = "model{suffix}.safetensors"
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
    parity: dict = field(default_factory=dict)
    lossy: dict | None = None
    dtype: str = "float32"
    num_shards: int = 1
    format_note: str | None = None
    commit_url: str | None = None


def export_model(
    model: nn.Module,
    output_dir: str | os.PathLike,
    options: ExportOptions | None = None,
    *,
    training: TrainingInfo | None = None,
    trained_dtype: str | None = None,
    **option_fields,
) -> ExportResult:
    """Export a model quantized with :func:`hf_cage.quantize_model` (after training) to ``output_dir``.

    Args:
        model: a transformers causal LM whose target linears are ``QATLinear``.
        options: an :class:`~hf_cage.export.options.ExportOptions`; ``option_fields`` (its field names as
            keywords: ``format=``, ``dtype=``, ``log=``, ...) override it.
        training: metrics / logs / tokenizer found beside the checkpoint (see ``TrainingInfo.from_dir``).
        trained_dtype: dtype the dense parameters were trained in (``dtype="auto"`` stores them so; default: the
            model's).
    Raises:
        ExportError: the model or options cannot be exported; nothing was written.
        ExportWriteError: the operating system refused a write; nothing was left behind.
        PushError: the push to ``push_to_hub`` failed; the export is kept (``err.result``).
        TypeError: an option that :class:`~hf_cage.export.options.ExportOptions` does not have.
    """
    options = ExportOptions.of(options, **option_fields)
    token = _push_token(options)
    output_dir = check_output_dir(output_dir, options.overwrite)
    layers = list(quantized_layers(model))
    config = quant_config_of(model)
    if not layers or config is None:
        raise ExportError("the model has no quantized layers; quantize it with hf_cage.quantize_model and train it")
    weights_only = options.weights_only
    fmt, conversion, note = resolve_format(
        options.format, config, weights_only=weights_only, allow_lossy=options.allow_lossy
    )
    shard_bytes = options.shard_bytes()
    exported_config = fmt.exported_config(config, conversion, weights_only=weights_only)
    problems = []
    for name, layer in layers:
        problem = packing_problem(layer.in_features, exported_config.weight_spec(layer.in_features))
        if problem:
            problems.append(f"{name}: {problem}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ExportError(f"cannot pack this model: {'; '.join(problems[:3])}{more}")
    trained_dtype = trained_dtype or _dense_dtype_of(model, {n for n, _ in layers})
    dtype = trained_dtype if options.dtype == "auto" else options.dtype
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPE_CHOICES)}")
    training = training or TrainingInfo()
    card = options.card or CardOptions()
    if options.push_to_hub and card.repo_id is None:
        card = replace(card, repo_id=options.push_to_hub)
    log = options.log
    if note and log:
        log(note)

    tensors, bf16_bytes, served, weight_error = _collect_tensors(
        model, layers, fmt, conversion, exported_config, weights_only, DTYPES[dtype], options.progress
    )
    compute_dtype = DTYPES[fmt.compute_dtype] if fmt.compute_dtype else None
    parity = measure_parity(model, served, DTYPES[dtype], compute_dtype=compute_dtype)
    if log:
        log(_parity_line(parity, conversion, weight_error))

    with staged_folder(output_dir) as staging:
        from huggingface_hub import save_torch_state_dict
        from safetensors import SafetensorError

        try:
            save_torch_state_dict(tensors, staging, filename_pattern=WEIGHTS_PATTERN, max_shard_size=shard_bytes)
        except SafetensorError as err:  # what safetensors raises when a write fails (disk full, ...): not an OSError
            raise as_os_error(err) from None
        weight_files = sorted(staging.glob("model*.safetensors"))
        size = sum(f.stat().st_size for f in weight_files)
        quantized = {name for name, _ in layers}
        write_config(model, staging, fmt, exported_config, config, conversion, weights_only=weights_only,
                     dtype=dtype, quantized=quantized, parity=parity)  # fmt: skip
        _copy_side_files(model, staging, training)
        curve = LOSS_CURVE if plot_loss_curve(training.log_history, staging / LOSS_CURVE) else None
        model_card = build_model_card(
            exported_config,
            fmt,
            trained_config=config,
            conversion=conversion,
            parity=parity,
            num_layers=len(layers),
            dense_dtype=dtype,
            trained_dtype=trained_dtype,
            size_bytes=size,
            bf16_size_bytes=bf16_bytes,
            training=training,
            options=card,
            weights_only=weights_only,
            weight_rel_error=weight_error,
            loss_curve=curve,
        )
        model_card.save(staging / "README.md")
    lossy = None
    if conversion.lossy:
        lossy = {"weight_rel_error": weight_error}
        lossy.update({k: parity[k] for k in ("logit_max_abs_diff", "logit_mean_abs_diff")})
    result = ExportResult(
        output_dir=output_dir,
        format=fmt.name,
        num_layers=len(layers),
        size_bytes=size,
        bf16_size_bytes=bf16_bytes,
        files=sorted(p.name for p in output_dir.iterdir()),
        parity=parity,
        lossy=lossy,
        dtype=dtype,
        num_shards=len(weight_files),
        format_note=note,
    )
    if options.push_to_hub:
        try:
            result.commit_url = hub.push_folder(
                result.output_dir,
                options.push_to_hub,
                token=token,
                private=options.private,
                revision=options.revision,
                commit_message=options.commit_message,
            )
        except PushError as err:
            err.result = result
            raise
    return result


def export_checkpoint(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    options: ExportOptions | None = None,
    **option_fields,
) -> ExportResult:
    """Export the QAT checkpoint in ``checkpoint_dir`` to ``output_dir`` (what ``hf-cage export`` runs).

    Checks every input before loading weights (paths, repo id and token for ``push_to_hub``, format, dtype, shard
    size), loads the checkpoint, and calls :func:`export_model` with what training left beside it (tokenizer,
    metrics, logs). ``options`` / ``option_fields`` as in :func:`export_model`.

    Raises:
        ExportError: bad input; nothing was written.
        ExportWriteError: the operating system refused a write; nothing was left behind.
        PushError: the push failed; the export is kept (``err.result``).
    """
    options = ExportOptions.of(options, **option_fields)
    options = replace(options, token=_push_token(options))
    check_output_dir(output_dir, options.overwrite, checkpoint=checkpoint_dir)
    config = check_checkpoint_dir(checkpoint_dir)
    resolve_format(options.format, config, weights_only=options.weights_only, allow_lossy=options.allow_lossy)
    options.shard_bytes()  # every option is checked before the weights are loaded
    model = load_checkpoint(checkpoint_dir, progress=options.progress)
    stored = checkpoint_dtype(checkpoint_dir)
    return export_model(
        model,
        output_dir,
        options,
        training=TrainingInfo.from_dir(checkpoint_dir),
        trained_dtype=stored if stored in DTYPES else None,
    )


def _push_token(options: ExportOptions) -> str | None:
    """The token of the push ``options`` ask for, checked with the repo id before anything is loaded or written."""
    if not options.push_to_hub:
        return options.token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(options.push_to_hub)
    except HFValidationError as err:
        raise ExportError(f"--push-to-hub {options.push_to_hub!r} is not a valid repo id: {err}") from None
    token = hub.resolve_token(options.token)
    if not token:
        raise ExportError(
            "--push-to-hub needs a Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`"
        )
    return token


def _dense_dtype_of(model: nn.Module, quantized: set[str]) -> str:
    for name, param in model.named_parameters():
        if param.is_floating_point() and name.rpartition(".")[0] not in quantized:
            return str(param.dtype).removeprefix("torch.")
    return "float32"


@torch.no_grad()
def _collect_tensors(model, layers, fmt: ExportFormat, conversion: Conversion, exported_config, weights_only,
                     dense_dtype: torch.dtype, progress: bool):  # fmt: skip
    """The checkpoint's tensors, the bf16 size of the dense model, the served layers and the weight error."""
    from tqdm.auto import tqdm

    state = model.state_dict()
    # A quantized layer is stored as its packed weight, its bias, and what the format asks for (layer_tensors);
    # its other state (e.g. a calibrated activation scale) is not dense model state.
    packed_weights = {f"{name}.{key}" for name, layer in layers for key in layer.state_dict() if key != "bias"}
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
    served, err_sq, ref_sq = {}, 0.0, 0.0
    for name, layer in tqdm(layers, desc="packing layers", unit="layer", disable=not progress):
        spec = exported_config.weight_spec(layer.in_features)
        if conversion.weights:
            trained_q = layer.weight_quantizer().float()
            packed = pack_weight(trained_q, spec)
            err_sq += (unpack_weight(packed, spec) - trained_q).square().sum().item()
            ref_sq += trained_q.square().sum().item()
        else:
            packed = pack_weight(layer.weight, spec)
        packed.update(fmt.layer_tensors(name, layer, exported_config, weights_only=weights_only))
        packed = {k: v.cpu() for k, v in packed.items()}
        for suffix, tensor in packed.items():
            tensors[f"{name}.{suffix}"] = tensor
        activation = fmt.served_activation_spec(exported_config, layer.in_features, weights_only=weights_only)
        served[name] = (packed, spec, activation)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    weight_error = (err_sq / max(ref_sq, 1e-30)) ** 0.5 if conversion.weights else None
    return tensors, bf16_bytes, served, weight_error


def _parity_line(parity: dict, conversion: Conversion, weight_error: float | None) -> str:
    measured = (
        f"logit difference on a sample batch max {parity['logit_max_abs_diff']:.4g} "
        f"mean {parity['logit_mean_abs_diff']:.4g} ({parity['tokens']} tokens, "
        f"{parity.get('compute_dtype', 'float32')}; "
        f"mean |logit| {parity['logit_scale']:.4g})"
    )
    if parity["logit_max_abs_diff"] == 0:
        return f"train/serve parity: exact, {measured}"
    reasons = [r for r in (conversion.weights, conversion.activations, *conversion.notes) if r]
    if weight_error is not None:
        reasons.append(f"relative weight error {weight_error:.4g}")
    why = f"; {'; '.join(reasons)}" if reasons else ""
    return f"served model differs from the trained one: {measured}{why}"


def _copy_side_files(model, staging: Path, training: TrainingInfo) -> None:
    for file in training.tokenizer_files:
        shutil.copyfile(file, staging / file.name)
    if training.generation_config is not None:
        shutil.copyfile(training.generation_config, staging / "generation_config.json")
    elif getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)

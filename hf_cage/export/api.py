"""``export_checkpoint`` (a checkpoint on disk) and ``export_model`` (a model in memory): packed checkpoints.

Everything is checked before anything is written. The files are written into a staging folder beside
``output_dir`` (``.NAME.hf-cage-staging-PID-XXXXXXXX``, created like any ``mkdir``, so its mode follows
the umask) and renamed into place at the end, so a failed or interrupted export leaves ``output_dir``
as it was. Staging folders left by a killed export (their process is gone) are removed by the next
export into the same parent folder; nothing else is touched.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..layers.packed import pack_weight, packing_problem, unpack_weight
from ..qat import CONFIG_KEY, EXPORT_KEY, quant_config_of, quantized_layers
from .card import CardOptions, build_model_card, plot_loss_curve
from .errors import ExportError, ExportWriteError, PushError
from .formats import Conversion, ExportFormat, export_metadata, resolve_format
from .parity import measure_parity
from .source import TrainingInfo, check_checkpoint_dir, checkpoint_dtype, load_checkpoint

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)
# transformers' ``PreTrainedModel.save_pretrained`` default: one file up to 50 GB.
DEFAULT_MAX_SHARD_SIZE = "50GB"
WEIGHTS_PATTERN = "model{suffix}.safetensors"
LOSS_CURVE = "loss_curve.png"
_TOOL_FOLDER = re.compile(r"^\..+\.hf-cage-(?:staging|old)-(\d+)-[0-9a-f]{8}$")


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


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(
    output_dir: str | os.PathLike, overwrite: bool, checkpoint: str | os.PathLike | None = None
) -> Path:
    """Refuse what an export must not write to; returns the absolute path.

    Refused: a file; a non-empty directory unless ``overwrite``; a folder that is, contains or lies inside
    ``checkpoint`` (replacing it would delete the checkpoint); a folder that contains the current directory.
    """
    output_dir = Path(os.path.abspath(output_dir))
    if checkpoint is not None:
        ckpt = Path(os.path.abspath(checkpoint))
        if output_dir == ckpt or _inside(ckpt.resolve(), output_dir.resolve()):
            raise ExportError(
                f"--output-dir {str(output_dir)!r} is or contains the checkpoint {str(ckpt)!r}; "
                "writing there would replace it: choose another directory"
            )
        if _inside(output_dir.resolve(), ckpt.resolve()):
            raise ExportError(
                f"--output-dir {str(output_dir)!r} is inside the checkpoint {str(ckpt)!r}; "
                "write the export outside the checkpoint folder"
            )
    try:
        _check_existing_output(output_dir, overwrite)
    except OSError as err:
        raise ExportWriteError(err.errno, f"cannot inspect {str(output_dir)!r}: {_os_reason(err)}") from None
    return output_dir


def _check_existing_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"output path {str(output_dir)!r} is a file; pass a directory")
    if output_dir.is_dir():
        if any(output_dir.iterdir()) and not overwrite:
            raise ExportError(f"output directory {str(output_dir)!r} is not empty; pass --overwrite to replace it")
        if _inside(Path.cwd().resolve(), output_dir.resolve()):
            raise ExportError(
                f"--output-dir {str(output_dir)!r} is (or contains) the current directory, which an export "
                "replaces: run from another directory or choose another --output-dir"
            )


def _parse_size(size) -> int:
    """Bytes of a shard size as the Hugging Face libraries read it, or -1 if it is none: a byte count, a decimal
    size as ``save_pretrained`` passes it to huggingface_hub (``5GB``, ``1.5GB``, ``500MB``, ``40KB``, ``1TB``), or a
    binary one as transformers' ``convert_file_size_to_int`` reads it (``2GiB``, ``512MiB``, ``64KiB``)."""
    from huggingface_hub.serialization._base import parse_size_to_int
    from transformers.utils.hub import convert_file_size_to_int

    if not isinstance(size, str):
        try:
            return int(size)
        except (TypeError, ValueError):
            return -1
    text = size.strip()
    if text.isdigit():
        return int(text)
    for parse in (parse_size_to_int, convert_file_size_to_int):
        try:
            return int(parse(text))
        except (ValueError, TypeError):
            continue
    return -1


def _check_options(dtype: str, max_shard_size) -> int:
    """Validate the options before anything is loaded or written; returns the shard size in bytes."""
    if dtype not in DTYPE_CHOICES:
        raise ExportError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPE_CHOICES)}")
    size = _parse_size(max_shard_size)
    if size <= 0:
        raise ExportError(
            f"max_shard_size={max_shard_size!r} is not a size; pass e.g. 5GB, 500MB, 2GiB or a byte count"
        )
    return size


def _dense_dtype_of(model: nn.Module, quantized: set[str]) -> str:
    for name, param in model.named_parameters():
        if param.is_floating_point() and name.rpartition(".")[0] not in quantized:
            return str(param.dtype).removeprefix("torch.")
    return "float32"


def export_model(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    format: str = "auto",
    weights_only: bool = False,
    allow_lossy: bool = False,
    dtype: str = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    training: TrainingInfo | None = None,
    card: CardOptions | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = _stderr,
    trained_dtype: str | None = None,
) -> ExportResult:
    """Export a model quantized with :func:`hf_cage.quantize_model` (after training) to ``output_dir``.

    Args:
        model: a transformers causal LM whose target linears are ``QATLinear``.
        format: ``"auto"`` (compressed-tensors when stock loaders serve the model as trained, else hf-cage),
            ``"compressed-tensors"`` (loads in transformers / vLLM) or ``"hf-cage"`` (any 4-bit hf-cage grid,
            loads with :func:`hf_cage.load_quantized`); see :mod:`hf_cage.export.formats`.
        weights_only: do not declare activation quantization in the compressed-tensors config.
        allow_lossy: let compressed-tensors hold a model it cannot serve as trained (QuEST grid, Hadamard,
            another activation rule); the measured difference is logged and put in the card.
        dtype: dtype of the tensors left dense (embeddings, norms, ``lm_head``); ``"auto"``: as trained
            (``trained_dtype``, else the model's), which keeps parity.
        max_shard_size: largest weight file, as transformers' ``save_pretrained`` (default ``"50GB"``); a
            bigger model is split into ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
        overwrite: replace a non-empty ``output_dir``.
        training: metrics / logs / tokenizer found beside the checkpoint (see ``TrainingInfo.from_dir``).
        card: metadata for the model card.
        log: where the one-line reports go (format chosen by ``auto``, measured parity).
    Raises:
        ExportError: the model or options cannot be exported; nothing was written.
        ExportWriteError: the operating system refused a write; nothing was left behind.
    """
    output_dir = check_output_dir(output_dir, overwrite)
    layers = list(quantized_layers(model))
    config = quant_config_of(model)
    if not layers or config is None:
        raise ExportError("the model has no quantized layers; quantize it with hf_cage.quantize_model and train it")
    fmt, conversion, note = resolve_format(format, config, weights_only=weights_only, allow_lossy=allow_lossy)
    shard_bytes = _check_options(dtype, max_shard_size)
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
    dtype = trained_dtype if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPE_CHOICES)}")
    training = training or TrainingInfo()
    card = card or CardOptions()
    if note and log:
        log(note)

    tensors, bf16_bytes, served, weight_error = _collect_tensors(
        model, layers, fmt, conversion, exported_config, weights_only, DTYPES[dtype], progress
    )
    compute_dtype = DTYPES[fmt.compute_dtype] if fmt.compute_dtype else None
    parity = measure_parity(model, served, DTYPES[dtype], compute_dtype=compute_dtype)
    if log:
        log(_parity_line(parity, conversion, weight_error))

    created = _missing_folders(output_dir.parent)
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_folders(output_dir.parent)
        staging = _new_folder(output_dir, "staging")
    except OSError as err:
        _remove_empty_folders(created)
        raise ExportWriteError(err.errno, f"cannot create {str(output_dir)!r}: {_os_reason(err)}") from None
    except BaseException:
        _remove_empty_folders(created)
        raise
    try:
        from huggingface_hub import save_torch_state_dict
        from safetensors import SafetensorError

        try:
            save_torch_state_dict(tensors, staging, filename_pattern=WEIGHTS_PATTERN, max_shard_size=shard_bytes)
        except SafetensorError as err:  # what safetensors raises when a write fails (disk full, ...): not an OSError
            raise _as_os_error(err) from None
        weight_files = sorted(staging.glob("model*.safetensors"))
        size = sum(f.stat().st_size for f in weight_files)
        _write_config(model, staging, fmt, exported_config, config, conversion, weights_only, dtype, layers, parity)
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
        _follow_umask(staging)
        _move_into_place(staging, output_dir)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty_folders(created)
        message = f"could not write the export to {str(output_dir)!r}: {_os_reason(err)}"
        raise ExportWriteError(err.errno, message) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty_folders(created)
        raise
    lossy = None
    if conversion.lossy:
        lossy = {"weight_rel_error": weight_error}
        lossy.update({k: parity[k] for k in ("logit_max_abs_diff", "logit_mean_abs_diff")})
    return ExportResult(
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


def export_checkpoint(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    format: str = "auto",
    weights_only: bool = False,
    allow_lossy: bool = False,
    dtype: str = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    card: CardOptions | None = None,
    push_to_hub: str | None = None,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = _stderr,
) -> ExportResult:
    """Export the QAT checkpoint in ``checkpoint_dir`` to ``output_dir`` (what ``hf-cage export`` runs).

    Checks every input before loading weights (paths, repo id and token for ``push_to_hub``, format,
    dtype, shard size), loads the checkpoint, calls :func:`export_model` with what training left beside
    it (tokenizer, metrics, logs), and pushes the folder to ``push_to_hub`` in one commit.

    Raises:
        ExportError: bad input; nothing was written.
        ExportWriteError: the operating system refused a write; nothing was left behind.
        PushError: the push failed; the export is kept (``err.result``).
    """
    from .hub import push_folder, resolve_token

    if push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(push_to_hub)
        except HFValidationError as err:
            raise ExportError(f"--push-to-hub {push_to_hub!r} is not a valid repo id: {err}") from None
        token = resolve_token(token)
        if not token:
            raise ExportError(
                "--push-to-hub needs a Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`"
            )
    check_output_dir(output_dir, overwrite, checkpoint=checkpoint_dir)
    config = check_checkpoint_dir(checkpoint_dir)
    resolve_format(format, config, weights_only=weights_only, allow_lossy=allow_lossy)  # before loading weights
    _check_options(dtype, max_shard_size)
    model = load_checkpoint(checkpoint_dir, progress=progress)
    card = card or CardOptions()
    if push_to_hub and card.repo_id is None:
        card.repo_id = push_to_hub
    result = export_model(
        model,
        output_dir,
        format=format,
        weights_only=weights_only,
        allow_lossy=allow_lossy,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        training=TrainingInfo.from_dir(checkpoint_dir),
        card=card,
        progress=progress,
        log=log,
        trained_dtype=stored if (stored := checkpoint_dtype(checkpoint_dir)) in DTYPES else None,
    )
    if push_to_hub:
        try:
            result.commit_url = push_folder(
                result.output_dir,
                push_to_hub,
                token=token,
                private=private,
                revision=revision,
                commit_message=commit_message,
            )
        except PushError as err:
            err.result = result
            raise
    return result


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


def _write_config(model, staging: Path, fmt, exported_config, trained_config, conversion, weights_only, dtype,
                  layers, parity):  # fmt: skip
    data = json.loads(model.config.to_json_string(use_diff=False))
    data.pop("quantization_config", None)
    data["dtype"] = dtype
    if not data.get("architectures"):
        data["architectures"] = [type(model).__name__]
    data[CONFIG_KEY] = exported_config.to_dict()
    data[EXPORT_KEY] = export_metadata(
        exported_config,
        fmt,
        weights_only=weights_only,
        lossy_from=trained_config if conversion.lossy else None,
        parity=parity,
    )
    quantized = {name for name, _ in layers}
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    quantization_config = fmt.quantization_config(exported_config, ignore, weights_only=weights_only)
    if quantization_config is not None:
        data["quantization_config"] = quantization_config
    (staging / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _copy_side_files(model, staging: Path, training: TrainingInfo) -> None:
    for file in training.tokenizer_files:
        shutil.copyfile(file, staging / file.name)
    if training.generation_config is not None:
        shutil.copyfile(training.generation_config, staging / "generation_config.json")
    elif getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)


def _new_folder(output_dir: Path, kind: str) -> Path:
    """A new, recognisably named folder beside ``output_dir``, mode from the umask like any ``mkdir``."""
    while True:
        path = output_dir.parent / f".{output_dir.name}.hf-cage-{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_folders(parent: Path) -> None:
    """Remove staging / old folders of this tool whose export process is gone (killed mid-write)."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _TOOL_FOLDER.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename ``staging`` to ``output_dir``, replacing whatever was there (already checked)."""
    if output_dir.exists():
        old = _new_folder(output_dir, "old")
        os.rename(output_dir, old / "previous")
        try:
            os.rename(staging, output_dir)
        except BaseException:  # OSError, or Ctrl-C / SIGTERM between the renames: the old export stays in place
            os.rename(old / "previous", output_dir)
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, output_dir)


def _missing_folders(folder: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` of ``folder`` would create, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _remove_empty_folders(folders: list[Path]) -> None:
    """Remove the folders an export created (innermost first) if they are still empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def _follow_umask(staging: Path) -> None:
    """Give the files the mode ``open`` gives under the umask (safetensors writes 0600); the staging folder was
    made by ``mkdir``, so its mode is ``0777 & ~umask``."""
    mode = staging.stat().st_mode & 0o666
    for file in staging.iterdir():
        if file.is_file() and not file.is_symlink():
            os.chmod(file, mode)


_OS_CODE = re.compile(r"(?:os error|code:) (\d+)")


def _as_os_error(err: Exception) -> OSError:
    """safetensors' write error as an ``OSError``; it reports the OS error code inside its message
    (``I/O error: No space left on device (os error 28)``)."""
    match = _OS_CODE.search(str(err))
    code = int(match.group(1)) if match else errno.EIO
    return OSError(code, os.strerror(code) if match else " ".join(str(err).split()))


def _os_reason(err: OSError) -> str:
    reason = err.strerror or errno.errorcode.get(err.errno or 0) or type(err).__name__
    where = err.filename if isinstance(err.filename, str) else None
    return f"{reason} ({where})" if where else reason

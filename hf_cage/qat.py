"""Turn a model's target linears into ``QATLinear`` layers, in place, and save / load such models.

A quantized model's state dict is exactly the dense model's (``QATLinear`` keeps ``weight`` and
``bias``), so ``save_pretrained`` writes an ordinary checkpoint. The ``QuantConfig`` rides along in
``config.json`` under :data:`CONFIG_KEY`, a key of hf-cage's own: transformers reads
``quantization_config`` as a request for one of its registered quantizers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import nn

from .layers.qat_linear import QATLinear
from .quant.config import QuantConfig

CONFIG_KEY = "hf_cage_quantization"


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QATLinear]]:
    """``(name, layer)`` for every ``QATLinear`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, QATLinear):
            yield name, module


def _is_target(name: str, config: QuantConfig) -> bool:
    parts = name.split(".")
    if any(part in config.skip_modules for part in parts):
        return False
    return parts[-1] in config.target_modules


def target_linears(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Linear]]:
    """``(name, linear)`` for every ``nn.Linear`` of ``model`` that :func:`quantize_model` would quantize."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and _is_target(n, config)]


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace every target ``nn.Linear`` of ``model`` by a ``QATLinear`` sharing its Parameters.

    Modules are matched by the last component of their name (``model.layers.0.self_attn.q_proj``
    matches ``q_proj``); names in ``config.skip_modules`` (``lm_head``, ``embed_tokens`` by default)
    are never touched. Returns the same ``model`` object.

    Raises:
        ValueError: nothing matched, the model is already quantized, or a layer's shape does not
            fit the config (group size, packing).
    """
    if any(True for _ in quantized_layers(model)):
        raise ValueError("model is already quantized (it contains QATLinear layers)")
    targets = target_linears(model, config)
    if not targets:
        linear_names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"no linear layer matched target_modules={config.target_modules}; "
            f"the model's linear layers are named {linear_names or 'nothing (it has no nn.Linear)'}"
        )
    errors = []
    for name, linear in targets:
        try:
            config.weight_spec(linear.in_features)
        except ValueError as err:
            errors.append(f"{name}: {err}")
    if errors:
        raise ValueError("cannot quantize this model:\n  " + "\n  ".join(errors))
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QATLinear.from_linear(linear, config).train(linear.training))
    if hasattr(model, "config"):
        setattr(model.config, CONFIG_KEY, config.to_dict())
    return model


def quant_config_of(model: nn.Module) -> QuantConfig | None:
    """The ``QuantConfig`` a model was quantized with, or ``None`` for a dense model."""
    for _, layer in quantized_layers(model):
        return layer.quant_config
    return None


def load_qat_model(path: str | os.PathLike, dtype: torch.dtype | str = "auto", **kwargs) -> nn.Module:
    """Load a model saved from a quantized model and quantize it again with its saved config.

    The result computes the same outputs, bit for bit, as the model that was saved. Loading is strict
    (:func:`load_pretrained`): a missing, unexpected or mis-shaped tensor, an unreadable file or a packed
    export raises :class:`CheckpointError`.
    """
    config = read_model_config(path)
    data = config.get(CONFIG_KEY)
    if data is None:
        raise CheckpointError(
            f"{os.fspath(path)!r} holds no hf-cage quantization config (config.json has no {CONFIG_KEY!r}); "
            "load it with transformers and call hf_cage.quantize_model(model, QuantConfig(...))"
        )
    model = load_pretrained(path, dtype=dtype, **kwargs)
    quantize_model(model, QuantConfig.from_dict(data))
    _load_layer_buffers(model, os.fspath(path))
    return model


# ----------------------------------------------------------------------------- strict loading
# Key of the description every packed export carries in config.json (written by hf_cage.export).
EXPORT_KEY = "hf_cage_export"
WEIGHTS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A saved model cannot be loaded as asked (unreadable, packed, or its tensors do not match); one line."""


def _names(keys) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - 5} more)" if len(keys) > 5 else ""
    return ", ".join(keys[:5]) + more


def check_loading_report(path, missing=(), unexpected=(), mismatched=()) -> None:
    """The one strictness rule of hf-cage's loaders: every tensor the model needs is in the checkpoint, with its
    shape, and the checkpoint holds nothing else. ``missing`` / ``unexpected`` / ``mismatched``: key names as a
    loader reported them (transformers' loading info, ``load_state_dict``'s result, or :func:`check_saved_tensors`).

    Raises:
        CheckpointError: one line naming the keys (a few of each, with the count).
    """
    parts = [
        f"{what} {_names(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
        if keys
    ]
    if parts:
        raise CheckpointError(
            f"{os.fspath(path)!r} does not hold the tensors of the model it describes: {'; '.join(parts)}; "
            "a model loaded from it would be partly random: re-save it, or pass the folder it was saved to"
        )


def read_model_config(path: str | os.PathLike) -> dict:
    """``config.json`` of a training checkpoint (dense or QAT) in ``path``, checked before any weight is read.

    Raises:
        FileNotFoundError: no such folder or ``config.json``.
        CheckpointError: malformed JSON, or a packed export / a checkpoint
            quantized by another tool (they load with their own loaders, and hold no trainable weights).
    """
    import json
    from pathlib import Path

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{os.fspath(path)!r} not found (not a directory); pass the folder written by save_pretrained"
        )
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{os.fspath(path)!r} has no config.json; pass the folder written by save_pretrained")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{file} is malformed, not valid JSON ({' '.join(str(err).split())}); re-save the model"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} is malformed (not a JSON object); re-save the model")
    export = config.get(EXPORT_KEY)
    if export is not None:
        fmt = export.get("format") if isinstance(export, dict) else None
        stock = "" if fmt == "hf-cage" else " (or transformers.AutoModelForCausalLM.from_pretrained(path))"
        raise CheckpointError(
            f"{os.fspath(path)!r} is a packed hf-cage export (format {fmt}), not a training checkpoint: load it with "
            f"hf_cage.load_quantized(path){stock}; to train or export, pass the checkpoint it was exported from"
        )
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict):
        method = quantization.get("quant_method")
        raise CheckpointError(
            f"{os.fspath(path)!r} is a quantized checkpoint (quantization_config, quant_method {method!r}), not a "
            "training checkpoint with dense weights: load it with transformers.AutoModelForCausalLM.from_pretrained"
        )
    return config


def saved_tensor_shapes(path: str | os.PathLike, weights_name: str = "model.safetensors") -> dict[str, list[int]]:
    """Name -> shape of every tensor in the safetensors checkpoint in ``path`` (one file or an index of shards),
    read from the file headers; every file is opened, so a truncated or corrupt file is found here.

    Raises:
        CheckpointError: no weights file, an index naming a missing shard, or an unreadable file.
    """
    import json
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    index = folder / weights_name.replace(".safetensors", ".safetensors.index.json")
    if (folder / weights_name).is_file():
        files = [folder / weights_name]
    elif index.is_file():
        try:
            files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is malformed ({err!r}); re-save the model") from None
    else:
        raise CheckpointError(f"{os.fspath(path)!r} has no {weights_name} (nor its index); re-save the model")
    shapes = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = list(f.get_slice(key).get_shape())
        except (OSError, SafetensorError) as err:
            raise CheckpointError(
                f"{file} is not a readable safetensors file ({' '.join(str(err).split())}); it may be truncated: "
                "re-save the model"
            ) from None
    return shapes


def check_saved_tensors(path: str | os.PathLike, state: dict, weights_name: str = "model.safetensors") -> None:
    """Refuse (:func:`check_loading_report`) unless the safetensors in ``path`` hold exactly the tensors of
    ``state`` (a model's ``state_dict()``), with their shapes. Keys of ``state`` sharing one tensor (tied
    embeddings) need only one of them saved. For loaders that do not report what they skipped (a Trainer resume).
    """
    saved = saved_tensor_shapes(path, weights_name)
    groups: dict[tuple, list[str]] = {}
    for key, value in state.items():
        alias = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        groups.setdefault(alias if value.numel() else (key,), []).append(key)
    missing = [keys[0] for keys in groups.values() if not any(k in saved for k in keys)]
    unexpected = [k for k in saved if k not in state]
    mismatched = [k for k in saved if k in state and list(state[k].shape) != saved[k]]
    check_loading_report(path, missing, unexpected, mismatched)


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | str = "auto", **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, ...)`` of a training checkpoint (dense, or saved from a
    quantized model: the dense model it holds), strictly: the config is checked first (:func:`read_model_config`),
    every weight file is opened, and transformers' own loading report must be clean (:func:`check_loading_report`).

    Raises:
        CheckpointError: one line saying what is wrong and how to load what was given.
    """
    from transformers import AutoConfig

    read_model_config(path)
    path = os.fspath(path)
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        saved_tensor_shapes(path)
    try:
        hf_config = AutoConfig.from_pretrained(path)
        model, info = _load_dense_model(hf_config, path, dtype=dtype, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise CheckpointError(f"{path!r} could not be loaded ({reason}); re-save the model") from None
    check_loading_report(path, info["missing_keys"], info["unexpected_keys"], [m[0] for m in info["mismatched_keys"]])
    return model


# State of quantized layers saved beside the dense weights (QATLinear buffers), as regexes on checkpoint keys.
LAYER_BUFFER_PATTERNS = (r"\.input_global_scale$",)


def _load_dense_model(hf_config, path: str, **kwargs):
    """The dense model ``from_pretrained`` builds (with ``output_loading_info``: ``(model, info)``), loaded through a
    throwaway subclass of the architecture's class whose ``_keys_to_ignore_on_load_unexpected`` adds the quantized
    layers' buffers (loaded afterwards by :func:`_load_layer_buffers`), so transformers' load report does not flag
    them. A subclass, not the class itself: that would be global state shared by every load and thread. The model
    returned is of the architecture's own class (the subclass adds no state)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    except KeyError:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    keys = [*(cls._keys_to_ignore_on_load_unexpected or []), *LAYER_BUFFER_PATTERNS]
    loader = type(cls.__name__, (cls,), {"_keys_to_ignore_on_load_unexpected": keys})
    loaded = loader.from_pretrained(path, **kwargs)
    (loaded[0] if isinstance(loaded, tuple) else loaded).__class__ = cls
    return loaded


@torch.no_grad()
def _load_layer_buffers(model: nn.Module, path: str) -> None:
    """Copy the quantized layers' saved buffers (an NVFP4 layer's calibrated ``input_global_scale``) from the
    checkpoint's safetensors files: the dense model ``from_pretrained`` built has no such buffers."""
    buffers = {f"{n}.{b}": t for n, layer in quantized_layers(model) for b, t in layer.named_buffers()}
    if not buffers:
        return
    import json
    from pathlib import Path

    from safetensors import safe_open

    index = Path(path) / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    found = set()
    for file in [Path(path) / f for f in files or ["model.safetensors"]]:
        if not file.is_file():
            continue
        with safe_open(file, framework="pt") as f:
            for key in buffers.keys() & set(f.keys()):
                buffers[key].copy_(f.get_tensor(key))
                found.add(key)
    check_loading_report(path, missing=buffers.keys() - found)

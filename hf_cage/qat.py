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

    The result computes the same outputs, bit for bit, as the model that was saved.
    """
    from transformers import AutoConfig

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory; pass the folder written by save_pretrained")
    hf_config = AutoConfig.from_pretrained(path)
    data = getattr(hf_config, CONFIG_KEY, None)
    if data is None:
        raise ValueError(
            f"{path!r} holds no hf-cage quantization config (config.json has no {CONFIG_KEY!r}); "
            "load it with transformers and call hf_cage.quantize_model(model, QuantConfig(...))"
        )
    model = _load_dense_model(hf_config, path, dtype=dtype, **kwargs)
    quantize_model(model, QuantConfig.from_dict(data))
    _load_layer_buffers(model, path)
    return model


# State of quantized layers saved beside the dense weights (QATLinear buffers), as regexes on checkpoint keys.
LAYER_BUFFER_PATTERNS = (r"\.input_global_scale$",)


def _load_dense_model(hf_config, path: str, **kwargs) -> nn.Module:
    """The dense model ``from_pretrained`` builds, loaded through a throwaway subclass of the architecture's class
    whose ``_keys_to_ignore_on_load_unexpected`` adds the quantized layers' buffers (loaded afterwards by
    :func:`_load_layer_buffers`), so transformers' load report does not flag them. A subclass, not the class itself:
    that would be global state shared by every load and thread. The model returned is of the architecture's own
    class (the subclass adds no state)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    except KeyError:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    keys = [*(cls._keys_to_ignore_on_load_unexpected or []), *LAYER_BUFFER_PATTERNS]
    loader = type(cls.__name__, (cls,), {"_keys_to_ignore_on_load_unexpected": keys})
    model = loader.from_pretrained(path, **kwargs)
    model.__class__ = cls
    return model


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
    missing = sorted(buffers.keys() - found)
    if missing:
        raise ValueError(f"{path!r} lacks the quantized layers' saved state {missing[:3]}; was it saved by hf-cage?")

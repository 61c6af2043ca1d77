"""``load_quantized``: load an hf-cage export (any format) into packed layers (``Int4Linear``, ``Fp4Linear``, ...).

The model is built from ``config.json`` without transformers' quantizer, every linear that has a
``weight_packed`` tensor becomes the packed layer its grid names (``Grid.packed_layer``: an
:class:`~hf_cage.Int4Linear` for the integer and QuEST grids, an :class:`~hf_cage.layers.fp4_linear.Fp4Linear`
for MXFP4 / NVFP4) with the weight and activation grids of the saved :class:`~hf_cage.QuantConfig`, and the
tensors are loaded as stored. Its forward therefore equals the QAT model's, activation quantization included (for
FP4 exports in the dtype it is loaded in: float32 by default, where stock transformers computes in bf16).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..layers.packed import packed_linear_class
from ..qat import CONFIG_KEY, EXPORT_KEY, check_loading_report, saved_tensor_shapes
from ..quant.config import QuantConfig


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    saved_tensor_shapes(path)  # every file opens (CheckpointError for a truncated one)
    single = path / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(path / shard))
        return state
    raise FileNotFoundError(f"{str(path)!r} has no model.safetensors; pass a directory written by `hf-cage export`")


def load_quantized(path: str | os.PathLike, dtype: torch.dtype | str = "auto", device: str | None = None) -> nn.Module:
    """Load an export written by ``hf-cage export`` / :func:`hf_cage.export_model`.

    Args:
        path: the export directory (e.g. from ``huggingface_hub.snapshot_download``).
        dtype: dtype of the dense parameters; ``"auto"`` uses the export's ``dtype``.
        device: where to put the model (default: CPU).
    Returns:
        A causal LM in eval mode whose quantized linears are packed layers (``Int4Linear``; ``Fp4Linear`` for
        FP4 grids; the generic ``PackedLinear`` for a grid without a layer of its own).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json; pass a directory written by `hf-cage export`")
    config = AutoConfig.from_pretrained(path)
    data = getattr(config, CONFIG_KEY, None)
    if data is None:
        raise ValueError(
            f"{str(path)!r} is not an hf-cage export (config.json has no {CONFIG_KEY!r}); "
            "load compressed-tensors checkpoints from other tools with transformers.AutoModelForCausalLM"
        )
    if getattr(config, EXPORT_KEY, None) is None:
        raise ValueError(
            f"{str(path)!r} is a QAT checkpoint with dense weights, not a packed export (config.json has no "
            f"{EXPORT_KEY!r}): load it with hf_cage.load_qat_model, or pack it first with `hf-cage export`"
        )
    quant_config = QuantConfig.from_dict(data)
    if quant_config.w_bits != 4:
        raise ValueError(
            f"load_quantized holds 4-bit weights (Int4Linear); this export has w_bits={quant_config.w_bits}: "
            "load it with transformers.AutoModelForCausalLM.from_pretrained"
        )
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build the dense skeleton; the packed layers are ours
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    state = _read_state_dict(path)
    if not any(k.endswith(".weight_packed") for k in state):
        raise ValueError(f"{str(path)!r} holds no packed weights (no *.weight_packed tensor); re-run `hf-cage export`")
    for key in [k for k in state if k.endswith(".weight_packed")]:
        name = key[: -len(".weight_packed")]
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} holds packed weights but is a {type(linear).__name__}, not a Linear")
        shape = state.pop(f"{name}.weight_shape", None)
        if shape is not None and shape.tolist() != [linear.out_features, linear.in_features]:
            raise ValueError(f"{name}: weight_shape {shape.tolist()} does not match the model config")
        weight_spec = quant_config.weight_spec(linear.in_features)
        layer = packed_linear_class(weight_spec)(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            weight_spec,
            quant_config.activation_spec(linear.in_features),
            dtype=dtype,
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = (
        set(getattr(model, "_tied_weights_keys", None) or [])
        if getattr(config, "tie_word_embeddings", False)
        else set()
    )
    check_loading_report(path, [k for k in missing if k not in tied], unexpected)
    if tied:
        model.tie_weights()
    return model.to(device).eval() if device else model.eval()

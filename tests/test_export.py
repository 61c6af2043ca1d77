"""export_model / load_quantized on tiny Llamas: packing, formats, exactness, the card and bad inputs."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import WIDE, make_tiny_llama

from hf_cage import Int4Linear, QuantConfig, quantize_model, quantized_layers
from hf_cage.export import (
    CardOptions,
    ExportError,
    ExportWriteError,
    TrainingInfo,
    export_checkpoint,
    export_model,
    load_checkpoint,
    load_quantized,
)
from hf_cage.kernels.packing import pack_codes, unpack_codes
from hf_cage.qat import CONFIG_KEY

INT_W4 = dict(quantizer="int", a_bits=None)
INT_W4A4_GROUP = dict(quantizer="int", a_bits=4, granularity="group", group_size=32)
QUEST_W4A4 = dict(quantizer="quest", a_bits=4)


# ----------------------------------------------------------------------------- helpers shared by the export tests
def qat_model(seed: int = 0, wide: bool = False, **quant) -> torch.nn.Module:
    """A tiny quantized Llama whose weights are bf16-representable (so a bf16 export of the dense rest is exact).

    ``wide``: hidden size 128 (every linear has >= 128 inputs, so group size 128 fits).
    """
    model = make_tiny_llama(seed, **(WIDE if wide else {}))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.bfloat16().float())
    return quantize_model(model, QuantConfig(**quant))


@contextmanager
def activations_unquantized(model):
    """Run the QAT model with its activation quantization switched off (what a W4A16 loader computes)."""
    layers = [layer for _, layer in quantized_layers(model)]
    saved = [layer.activation_spec for layer in layers]
    for layer in layers:
        layer.activation_spec = None
    try:
        yield model
    finally:
        for layer, spec in zip(layers, saved):
            layer.activation_spec = spec


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch).logits


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(60)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(path)


def save_checkpoint(root: Path, model, *, trainer_checkpoint: bool = True, metrics: dict | None = None) -> Path:
    """Save like the recipes: ``root/`` holds tokenizer and metrics.json, ``root/checkpoint-10/`` the Trainer state."""
    root.mkdir(parents=True, exist_ok=True)
    save_tokenizer(root)
    if metrics is not None:
        (root / "metrics.json").write_text(json.dumps(metrics))
    if not trainer_checkpoint:
        model.save_pretrained(root)
        return root
    ckpt = root / "checkpoint-10"
    model.save_pretrained(ckpt)
    torch.save({"state": {}}, ckpt / "optimizer.pt")
    history = [{"step": s, "loss": 5.0 - 0.3 * s, "learning_rate": 1e-3} for s in range(1, 11)]
    history.append({"step": 10, "eval_loss": 2.5})
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": history}))
    return ckpt


METRICS = {
    "method": "cage",
    "w_bits": 4,
    "a_bits": 4,
    "max_steps": 10,
    "tokens": 81920,
    "cage_lambda": 10.0,
    "cage_silence_ratio": 0.8,
    "eval_loss": 2.5,
    "eval_perplexity": 12.18,
    "baselines": {"ste": 2.61, "bf16": 2.31},
}


# ----------------------------------------------------------------------------- packing
def test_pack_int8_matches_compressed_tensors_and_round_trips():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(-128, 128, (5, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    packed = pack_codes(codes, 8)
    assert packed.shape == (5, 16) and packed.dtype == torch.int32
    assert torch.equal(packed, pack_to_int32(codes, num_bits=8))
    assert torch.equal(unpack_codes(packed, 8), codes)
    # codes -128, -1, 0, 127 -> bytes 0x00, 0x7F, 0x80, 0xFF, lowest first: word 0xFF807F00 (negative as int32)
    golden = torch.tensor([[-128, -1, 0, 127]], dtype=torch.int8)
    assert pack_codes(golden, 8).tolist() == [[0xFF807F00 - 2**32]]
    with pytest.raises(ValueError, match="cannot pack 3-bit"):
        pack_codes(codes, 3)


def test_sub_4_bit_codes_pack_densely_as_compressed_tensors_unpacks_them():
    """3-bit codes straddle int32 words (compressed-tensors' pack_to_int32 layout, what its loaders unpack).

    Codes ``i % 8 - 4`` for i = 0..31 are the fields 0..7 repeated, 3 bits each, lowest first: word 0 holds
    codes 0..9 and the low 2 bits of code 10 (field 2 = 0b010 -> bits 31..30 = 0b10), word 1 starts with its
    high bit (0). Word 0, bit 31 first: 10 001 000 111 110 101 100 011 010 001 000.
    """
    from hf_cage.kernels.packing import pack_int_codes, unpack_int_codes

    codes = (torch.arange(32) % 8 - 4).reshape(1, 32)
    packed = pack_int_codes(codes, 3)
    words = [format(int(w) & 0xFFFFFFFF, "032b") for w in packed[0]]
    assert packed.shape == (1, 3) and words[:2] == [
        "10001000111110101100011010001000",
        "11000110100010001111101011000110",
    ]
    assert torch.equal(unpack_int_codes(packed, 3, 32).long(), codes)
    two = pack_int_codes(torch.tensor([[-2, -1, 0, 1] * 4]), 2)  # fields 0, 1, 2, 3: 0b11100100 four times
    assert two.shape == (1, 1) and format(int(two[0, 0]) & 0xFFFFFFFF, "032b") == "11100100" * 4


def test_one_conversion_for_int4_linear_export_and_lora(tmp_path):
    """Int4Linear.from_qat_linear and the export store the same tensors: both are pack_weight."""
    from safetensors.torch import load_file

    from hf_cage.layers.packed import pack_weight, unpack_weight

    model = qat_model(**INT_W4A4_GROUP)
    export_model(model, tmp_path / "out", progress=False, log=None)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    for name, layer in quantized_layers(model):
        packed = Int4Linear.from_qat_linear(layer)
        assert torch.equal(packed.weight_packed, tensors[f"{name}.weight_packed"])
        assert torch.equal(packed.weight_scale, tensors[f"{name}.weight_scale"])
        expected = pack_weight(layer.weight, layer.weight_spec)
        assert all(torch.equal(expected[k], tensors[f"{name}.{k}"]) for k in expected)
        assert torch.equal(unpack_weight(expected, layer.weight_spec), layer.weight_quantizer())


# ----------------------------------------------------------------------------- compressed-tensors
@pytest.mark.parametrize("granularity, group_size", [("group", 32), ("group", 64), ("group", 128), ("channel", None)])
def test_compressed_tensors_export_is_bit_exact(tmp_path, granularity, group_size):
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    quant = dict(quantizer="int", a_bits=4, granularity=granularity, group_size=group_size)
    model = qat_model(wide=True, **quant)
    result = export_model(model, tmp_path / "out", progress=False, log=None)
    out = tmp_path / "out"
    assert result.format == "compressed-tensors" and result.num_layers == 14
    assert result.parity["logit_max_abs_diff"] == 0 and result.dtype == "float32"
    assert {"config.json", "model.safetensors", "README.md", "generation_config.json"} <= set(result.files)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "version"})
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    group = qc["config_groups"]["group_0"]
    assert group["weights"] == {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": granularity,
        "group_size": group_size,
        "dynamic": False,
    }
    assert group["input_activations"] == {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "token",
        "group_size": None,
        "dynamic": True,
    }
    assert config["dtype"] == "float32" and config[CONFIG_KEY]["quantizer"] == "int"
    assert config[CONFIG_KEY]["a_clip"] == "minmax"

    tensors = load_file(out / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    for name, layer in quantized_layers(model):
        group = group_size or layer.in_features
        assert f"{name}.weight" not in tensors
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        assert packed.dtype == torch.int32 and packed.shape == (layer.out_features, layer.in_features // 8)
        assert scale.dtype == torch.float32 and scale.shape == (layer.out_features, layer.in_features // group)
        assert tensors[f"{name}.weight_shape"].tolist() == [layer.out_features, layer.in_features]
        codes = unpack_codes(packed, 4).float().reshape(layer.out_features, -1, group)
        dequantized = (codes * scale.unsqueeze(-1)).reshape(layer.out_features, layer.in_features)
        torch.testing.assert_close(dequantized, layer.weight_quantizer(), atol=0, rtol=0)


def test_bf16_dense_parts_are_measured_not_claimed_exact(tmp_path):
    from safetensors.torch import load_file

    model = make_tiny_llama(3)  # fp32 weights that bf16 cannot hold
    quantize_model(model, QuantConfig(**INT_W4A4_GROUP))
    lines = []
    result = export_model(model, tmp_path / "out", dtype="bfloat16", progress=False, log=lines.append)
    assert load_file(tmp_path / "out" / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    assert result.parity["logit_max_abs_diff"] > 0
    assert len(lines) == 1 and lines[0].startswith("served model differs from the trained one")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**Train/serve parity: not exact.**" in card and "stored in bfloat16 (trained in float32)" in card


def test_weights_only_drops_activations_and_prints_the_difference(tmp_path):
    model = qat_model(quantizer="int", a_bits=4)
    lines = []
    result = export_model(model, tmp_path / "out", weights_only=True, progress=False, log=lines.append)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"] is None
    assert group["weights"]["strategy"] == "channel" and group["weights"]["group_size"] is None
    assert config["hf_cage_export"]["weights_only"] is True
    assert result.parity["logit_max_abs_diff"] > 0
    assert "served unquantized (W4A16)" in lines[0]


def test_weights_only_export_loads_as_w4a16_in_hf_cage_and_transformers(tmp_path, token_batch):
    from transformers import AutoModelForCausalLM

    model = qat_model(quantizer="int", a_bits=4)
    export_model(model, tmp_path / "out", weights_only=True, progress=False, log=None)
    assert json.loads((tmp_path / "out" / "config.json").read_text())[CONFIG_KEY]["a_bits"] is None
    loaded = load_quantized(tmp_path / "out")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with activations_unquantized(model):
        expected = logits(model, token_batch)
    torch.testing.assert_close(logits(loaded, token_batch), expected, atol=0, rtol=0)
    torch.testing.assert_close(logits(stock, token_batch), expected, atol=0, rtol=0)


def test_int8_export_loads_in_transformers_exactly(tmp_path, token_batch):
    from transformers import AutoModelForCausalLM

    model = qat_model(quantizer="int", w_bits=8, a_bits=None)
    export_model(model, tmp_path / "out", progress=False, log=None)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    # compressed-tensors unpacks the weights on the first forward pass
    torch.testing.assert_close(logits(loaded, token_batch), logits(model, token_batch), atol=0, rtol=0)
    for name, layer in quantized_layers(model):
        torch.testing.assert_close(loaded.get_submodule(name).weight, layer.weight_quantizer(), atol=0, rtol=0)
    with pytest.raises(ValueError, match="w_bits=8"):
        load_quantized(tmp_path / "out")


# ----------------------------------------------------------------------------- load_quantized
@pytest.mark.parametrize(
    "quant, fmt",
    [
        (INT_W4A4_GROUP, "compressed-tensors"),
        (QUEST_W4A4, "hf-cage"),
        (dict(quantizer="int", a_bits=8), "hf-cage"),
        (dict(quantizer="int", a_bits=4, a_clip="mse"), "auto"),
    ],
    ids=["int-group-ct", "quest-hadamard-hfcage", "int-w4a8-hfcage", "int-mse-activations-auto"],
)
def test_load_quantized_reproduces_the_qat_model(tmp_path, token_batch, quant, fmt):
    model = qat_model(**quant)
    result = export_model(model, tmp_path / "out", format=fmt, progress=False, log=None)
    assert result.parity["logit_max_abs_diff"] == 0
    loaded = load_quantized(tmp_path / "out")
    names = [name for name, _ in quantized_layers(model)]
    assert names and all(isinstance(loaded.get_submodule(n), Int4Linear) for n in names)
    for name, layer in quantized_layers(model):
        packed = loaded.get_submodule(name)
        torch.testing.assert_close(packed.dequantized_weight(), layer.weight_quantizer(), atol=0, rtol=0)
        assert packed.activation_spec == layer.activation_spec
    torch.testing.assert_close(logits(loaded, token_batch), logits(model, token_batch), atol=0, rtol=0)


def test_each_format_object_loads_its_own_export(tmp_path, token_batch):
    from transformers import AutoModelForCausalLM

    from hf_cage.export import FORMATS

    for name, quant in (("compressed-tensors", INT_W4A4_GROUP), ("hf-cage", QUEST_W4A4)):
        model = qat_model(**quant)
        result = export_model(model, tmp_path / name, format=name, progress=False, log=None)
        assert result.format == name
        if name == "hf-cage":
            loaded = load_quantized(tmp_path / name)
        else:
            dtype = getattr(torch, FORMATS[name].load_dtype)
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=dtype).eval()
        torch.testing.assert_close(logits(loaded, token_batch), logits(model, token_batch), atol=0, rtol=0)


def test_load_quantized_refuses_a_dense_qat_checkpoint(tmp_path):
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), trainer_checkpoint=False)
    with pytest.raises(ValueError, match="not a packed export.*load_qat_model.*hf-cage export"):
        load_quantized(ckpt)


def test_hf_cage_format_carries_its_metadata_and_no_transformers_quantizer(tmp_path):
    export_model(qat_model(**QUEST_W4A4), tmp_path / "out", format="hf-cage", progress=False, log=None)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    meta = config["hf_cage_export"]
    assert meta["format"] == "hf-cage" and meta["weight_grid"] == "midrise" and meta["code_offset"] == 0.5
    assert meta["hadamard"] is True and config[CONFIG_KEY]["quantizer"] == "quest"
    assert meta["parity"]["logit_max_abs_diff"] == 0


def test_tied_embeddings_are_stored_once_and_retied(tmp_path, token_batch):
    model = make_tiny_llama(0, tie_word_embeddings=True)
    quantize_model(model, QuantConfig(**INT_W4))
    export_model(model, tmp_path / "out", progress=False, log=None)
    loaded = load_quantized(tmp_path / "out")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(loaded, token_batch), logits(model, token_batch), atol=0, rtol=0)


# ----------------------------------------------------------------------------- shards
def test_sharded_export_loads_to_the_same_logits(tmp_path, token_batch):
    from safetensors.torch import load_file

    model = qat_model(**INT_W4A4_GROUP)
    single = export_model(model, tmp_path / "single", progress=False, log=None)
    sharded = export_model(model, tmp_path / "sharded", max_shard_size="40KB", progress=False, log=None)
    assert single.num_shards == 1 and sharded.num_shards > 2
    files = set(sharded.files)
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    n = sharded.num_shards
    assert {f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)} <= files
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    whole = load_file(tmp_path / "single" / "model.safetensors")
    assert set(index["weight_map"]) == set(whole)
    for key, file in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / "sharded" / file)[key], whole[key])
    reference = logits(load_quantized(tmp_path / "single"), token_batch)
    torch.testing.assert_close(logits(load_quantized(tmp_path / "sharded"), token_batch), reference, atol=0, rtol=0)
    with pytest.raises(ExportError, match="max_shard_size"):
        export_model(model, tmp_path / "bad", max_shard_size="lots", progress=False, log=None)


@pytest.mark.parametrize(
    "size, expected",
    [
        ("40KB", 40_000),
        ("1.5GB", 1_500_000_000),
        ("5 mb", 5_000_000),
        ("2TB", 2 * 10**12),
        ("2GiB", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("64KiB", 64 * 2**10),
        ("1000", 1000),
        (1000, 1000),
        ("lots", -1),
        ("5XB", -1),
        ("", -1),
        (None, -1),
    ],
)
def test_shard_sizes_are_read_as_huggingface_hub_and_transformers_read_them(size, expected):
    from hf_cage.export.options import parse_size

    assert parse_size(size) == expected


# ----------------------------------------------------------------------------- formats: exact, or measured and loud
def test_auto_format_picks_hf_cage_for_quest_and_says_why(tmp_path):
    lines = []
    result = export_model(qat_model(**QUEST_W4A4), tmp_path / "out", progress=False, log=lines.append)
    assert result.format == "hf-cage"
    assert lines[0].startswith("format auto: hf-cage, because") and "hf_cage.load_quantized" in lines[0]
    assert lines[1].startswith("train/serve parity: exact")


@pytest.mark.parametrize(
    "quant, match",
    [
        (QUEST_W4A4, "QuEST mid-rise grid"),
        (dict(quantizer="int", a_bits=4, hadamard=True), "Hadamard"),
        (dict(quantizer="int", a_bits=4, a_clip="absmax"), "a_clip='absmax'"),
    ],
    ids=["quest", "int-hadamard", "int-absmax-activations"],
)
def test_compressed_tensors_refuses_what_it_would_serve_differently(tmp_path, quant, match):
    with pytest.raises(ExportError, match=match) as info:
        export_model(qat_model(**quant), tmp_path / "out", format="compressed-tensors", progress=False, log=None)
    assert "--allow-lossy" in str(info.value) and "--format hf-cage" in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("quant", [QUEST_W4A4, dict(quantizer="int", a_bits=4, a_clip="mse")], ids=["quest", "mse"])
def test_allowed_lossy_conversion_reports_its_measured_error(tmp_path, quant):
    lines = []
    model = qat_model(**quant)
    result = export_model(
        model, tmp_path / "out", format="compressed-tensors", allow_lossy=True, progress=False, log=lines.append
    )
    report = result.lossy
    assert report["logit_max_abs_diff"] > 0 and report["logit_mean_abs_diff"] > 0
    assert len(lines) == 1 and "logit difference on a sample batch max" in lines[0]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config[CONFIG_KEY]["quantizer"] == "int" and config[CONFIG_KEY]["hadamard"] is False
    assert config[CONFIG_KEY]["a_clip"] == "minmax"
    assert config["hf_cage_export"]["lossy_conversion_from"]["quantizer"] == quant["quantizer"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**Lossy conversion.**" in card and "**Train/serve parity: not exact.**" in card
    if quant["quantizer"] == "quest":
        assert 0 < report["weight_rel_error"] < 0.5 and "relative weight error" in lines[0]
    else:
        assert report["weight_rel_error"] is None and "a_clip='mse'" in lines[0]


# ----------------------------------------------------------------------------- model card
def _card(tmp_path, name, quant, **kwargs) -> str:
    export_model(qat_model(**quant), tmp_path / name, progress=False, log=None, **kwargs)
    return (tmp_path / name / "README.md").read_text()


def test_card_notes_per_format(tmp_path):
    served = _card(tmp_path, "w4a4", INT_W4A4_GROUP)
    assert "**Train/serve parity: exact.**" in served and "stored in float32 as trained" in served
    assert "the rule this model was trained with" in served and "clamp to `[-8, 7]`" in served
    assert "**vLLM.**" in served and "SM80-SM89" in served and "Hopper" in served and "no GPU" not in served
    assert "from vllm import LLM" in served and "dtype=torch.float32" in served

    weights_only = _card(tmp_path, "w4a16", INT_W4A4_GROUP, weights_only=True)
    assert "declares weights only, so transformers and vLLM run it as W4A16" in weights_only
    assert "**vLLM.**" not in weights_only and "w4a16" in weights_only

    w8a8 = _card(tmp_path, "w8a8", dict(quantizer="int", w_bits=8, a_bits=8))
    assert "to 8 bits" in w8a8 and "clamp to `[-128, 127]`" in w8a8
    assert "hf_cage.load_quantized" not in w8a8  # it holds 4-bit weights only

    quest = _card(tmp_path, "quest", QUEST_W4A4)
    assert "only `hf_cage.load_quantized` loads it" in quest and "no `transform_config`" in quest
    assert "from vllm import LLM" not in quest and "library_name: hf-cage" in quest
    assert "the QuEST mid-rise grid with Hadamard rotations" in quest

    lossy = _card(tmp_path, "lossy", QUEST_W4A4, format="compressed-tensors", allow_lossy=True)
    assert "**Hadamard.**" in lossy and "not the rule this model was trained with" in lossy


def _card_row(card: str, name: str) -> str:
    rows = [line for line in card.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, rows
    return rows[0].split("|")[2].strip()


def test_card_activations_row_says_how_activations_were_quantized(tmp_path):
    assert _card_row(_card(tmp_path, "w4a4", INT_W4A4_GROUP), "Activations") == (
        "4-bit per token, integer grid, `a_clip='minmax'`"
    )
    assert _card_row(_card(tmp_path, "quest", QUEST_W4A4), "Activations") == (
        "4-bit per token, mid-rise grid, `a_clip='mse'`"
    )
    assert _card_row(_card(tmp_path, "mx", dict(quantizer="mxfp4", a_bits=4)), "Activations") == (
        "4-bit per token and group of 32, MXFP4 (E2M1) grid, dynamic group scales"
    )
    assert _card_row(_card(tmp_path, "w4", INT_W4), "Activations") == "not quantized (16-bit)"


@pytest.mark.parametrize("grid", ["mxfp4", "nvfp4"])
def test_fp4_w4a4_card_says_the_loaders_apply_the_trained_activation_rule(tmp_path, token_batch, grid):
    model = qat_model(quantizer=grid, a_bits=4)
    model(input_ids=token_batch)  # calibrates NVFP4's input_global_scale
    export_model(model, tmp_path / "w4a4", progress=False, log=None)
    card = (tmp_path / "w4a4" / "README.md").read_text()
    scale = "E8M0) scale per token and group of 32" if grid == "mxfp4" else "E4M3 scale per token and group of 16"
    assert "**Activations.** The loaders quantize each linear's input to FP4 (E2M1) with" in card
    assert scale in card and "the rule this model was trained with" in card
    export_model(model, tmp_path / "w4a16", weights_only=True, progress=False, log=None)
    card = (tmp_path / "w4a16" / "README.md").read_text()
    assert "export declares weights only, so transformers and vLLM run it with unquantized activations" in card


def test_card_has_metadata_training_summary_and_loss_curve(tmp_path):
    from huggingface_hub import ModelCard

    run = tmp_path / "run"
    save_checkpoint(run, qat_model(**INT_W4A4_GROUP), trainer_checkpoint=False, metrics=METRICS)
    history = [{"step": s, "loss": 5.0 - 0.3 * s} for s in range(1, 11)] + [{"step": 10, "eval_loss": 2.5}]
    (run / "log_history.json").write_text(json.dumps(history))  # a recipe run folder: no trainer_state.json
    options = CardOptions(repo_id="me/tiny-cage", base_model="meta-llama/Llama-3.2-1B", datasets=["allenai/c4"])
    result = export_model(
        load_checkpoint(run), tmp_path / "out", training=TrainingInfo.from_dir(run), card=options, log=None
    )
    out = tmp_path / "out"
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(result.files)
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["base_model"] == "meta-llama/Llama-3.2-1B"
    assert {"hf-cage", "cage", "qat", "int4", "w4a4", "compressed-tensors"} <= set(data["tags"])
    assert data["license"] == "apache-2.0" and data["pipeline_tag"] == "text-generation"
    assert data["datasets"] == ["allenai/c4"]
    text = card.text
    for expected in [
        "| Weights | 4-bit, integer grid, per group (group size 32) |",
        "| CAGE lambda | 10 |",
        "| CAGE silence ratio | 0.8 |",
        "| eval loss | 2.5 |",
        "| eval perplexity | 12.18 |",
        "| training tokens | 81,920 |",
        "| ste | 2.61 |",
        "![loss curve](loss_curve.png)",
        'AutoModelForCausalLM.from_pretrained("me/tiny-cage", dtype=torch.float32)',
        "from vllm import LLM",
        "hf_cage.load_quantized",
        "arXiv:2510.18784",
    ]:
        assert expected in text, expected


def test_card_of_an_earlier_checkpoint_describes_that_checkpoint(tmp_path):
    """run/checkpoint-10 of a run whose final metrics.json says 500 steps: the card gives step 10 and its losses."""
    final = dict(METRICS, steps=500, max_steps=500, eval_loss=1.9, tokens=4_096_000)
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4A4_GROUP), metrics=final)
    info = TrainingInfo.from_dir(ckpt)
    assert info.metrics["steps"] == 10 and info.metrics["eval_loss"] == 2.5
    assert info.metrics["train_loss"] == pytest.approx(2.0) and "tokens" not in info.metrics
    assert info.metrics["cage_lambda"] == 10.0 and "baselines" not in info.metrics
    export_model(load_checkpoint(ckpt), tmp_path / "out", training=info, progress=False, log=None)
    text = (tmp_path / "out" / "README.md").read_text()
    assert "| steps | 10 |" in text and "| eval loss | 2.5 |" in text and "| train loss | 2 |" in text
    assert "500" not in text and "1.9" not in text and "ste | 2.61" not in text
    assert "![loss curve](loss_curve.png)" in text


def test_card_without_training_logs_has_no_training_section(tmp_path):
    text = _card(tmp_path, "out", INT_W4)
    assert "## Training" not in text and "loss_curve" not in text
    assert not (tmp_path / "out" / "loss_curve.png").exists()


def test_usage_load_and_served_dtype_come_from_the_format_objects(tmp_path):
    from hf_cage.export.formats import FORMATS, stock_load_dtype

    ct, mx = FORMATS["compressed-tensors"], FORMATS["mxfp4-pack-quantized"]
    assert "dtype=torch.float32" in ct.usage("me/m") and "dtype=torch.bfloat16" in mx.usage("me/m")
    assert [stock_load_dtype(f) for f in ("pack-quantized", "mxfp4-pack-quantized", "nvfp4-pack-quantized")] == [
        "float32",
        "bfloat16",
        "bfloat16",
    ]
    assert stock_load_dtype(None) == "float32"


def test_card_template_is_package_data():
    from importlib import resources

    from hf_cage.export.card import template_text

    assert (resources.files("hf_cage.export") / "templates" / "model_card.md").is_file()
    assert "{{ card_data }}" in template_text()


# ----------------------------------------------------------------------------- bad inputs, nothing written
def test_non_empty_output_dir_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="--overwrite"):
        export_model(qat_model(**INT_W4), out, progress=False, log=None)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_model(qat_model(**INT_W4), out, overwrite=True, progress=False, log=None)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folders left


@pytest.mark.parametrize("where", ["the-checkpoint", "its-parent", "inside-it"])
def test_output_dir_that_is_contains_or_is_inside_the_checkpoint_is_refused(tmp_path, where):
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), metrics=METRICS)
    out = {"the-checkpoint": ckpt, "its-parent": ckpt.parent, "inside-it": ckpt / "export"}[where]
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    with pytest.raises(ExportError, match="checkpoint"):
        export_checkpoint(ckpt, out, overwrite=True, progress=False, log=None)
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_output_dir_containing_the_current_directory_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    monkeypatch.chdir(out / "sub")
    with pytest.raises(ExportError, match="current directory"):
        export_model(qat_model(**INT_W4), ".", overwrite=True, progress=False, log=None)
    with pytest.raises(ExportError, match="current directory"):
        export_model(qat_model(**INT_W4), "..", overwrite=True, progress=False, log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "sub").is_dir()


def test_invalid_repo_id_is_refused_before_anything_is_written(tmp_path):
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), trainer_checkpoint=False)
    with pytest.raises(ExportError, match="not a valid repo id"):
        export_checkpoint(ckpt, tmp_path / "out", push_to_hub="not a/valid/repo id!!", token="x", log=None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: make_tiny_llama(0), "no quantized layers"),
        (lambda: qat_model(quantizer="quest", w_bits=2, a_bits=None), "w_bits=2"),
        (lambda: qat_model(quantizer="quest", w_bits=3, a_bits=3), "w_bits=3"),
        (lambda: quantize_model(make_tiny_llama(0, intermediate_size=100), QuantConfig(**INT_W4)), "multiple of 8"),
    ],
    ids=["dense", "quest-w2", "quest-w3a3", "in-features-100"],
)
def test_models_no_format_can_hold_are_refused(tmp_path, build, match):
    with pytest.raises(ExportError, match=match):
        export_model(build(), tmp_path / "out", progress=False, log=None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("w_bits, a_bits", [(3, 3), (3, None), (2, None)])
def test_sub_4_bit_quest_models_are_refused_with_advice_that_works(tmp_path, w_bits, a_bits):
    """hf-cage's format holds 4-bit weights and compressed-tensors no mid-rise grid: auto refuses a 2- or 3-bit
    QuEST model, and the conversion it advises (--allow-lossy to compressed-tensors) is one that runs."""
    model = qat_model(quantizer="quest", w_bits=w_bits, a_bits=a_bits)
    with pytest.raises(ExportError, match=f"w_bits={w_bits}") as info:
        export_model(model, tmp_path / "out", progress=False, log=None)
    assert "--format compressed-tensors --allow-lossy" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    result = export_model(
        model, tmp_path / "out", format="compressed-tensors", allow_lossy=True, progress=False, log=None
    )
    assert result.format == "compressed-tensors" and result.lossy is not None


def test_sub_4_bit_int_models_export_exactly_to_compressed_tensors(tmp_path):
    for w_bits, a_bits in [(3, 3), (3, None), (2, None), (2, 2)]:
        model = qat_model(quantizer="int", w_bits=w_bits, a_bits=a_bits)
        result = export_model(model, tmp_path / f"w{w_bits}a{a_bits}", progress=False, log=None)
        assert result.format == "compressed-tensors" and result.parity["logit_max_abs_diff"] == 0
        card = (tmp_path / f"w{w_bits}a{a_bits}" / "README.md").read_text()
        assert "vLLM's compressed-tensors kernels take 4- and 8-bit integer weights" in card
        with pytest.raises(ExportError, match="use --format compressed-tensors"):
            export_model(model, tmp_path / "hf", format="hf-cage", progress=False, log=None)


def test_weights_only_never_silently_becomes_an_hf_cage_export(tmp_path):
    with pytest.raises(ExportError, match="--weights-only is a compressed-tensors declaration") as info:
        export_model(qat_model(**QUEST_W4A4), tmp_path / "out", weights_only=True, progress=False, log=None)
    assert "--allow-lossy" in str(info.value)
    lines = []
    argv = dict(format="compressed-tensors", allow_lossy=True, weights_only=True, progress=False, log=lines.append)
    result = export_model(qat_model(**QUEST_W4A4), tmp_path / "out", **argv)
    assert result.format == "compressed-tensors" and "served unquantized (W4A16)" in lines[0]
    assert not list(tmp_path.glob(".*"))


def test_hf_cage_format_refuses_8_bit_and_unknown_options(tmp_path):
    with pytest.raises(ExportError, match="use --format compressed-tensors"):
        export_model(qat_model(quantizer="int", w_bits=8, a_bits=None), tmp_path / "o", format="hf-cage", log=None)
    with pytest.raises(ExportError, match="unknown format"):
        export_model(qat_model(**INT_W4), tmp_path / "o", format="gguf", log=None)
    with pytest.raises(ExportError, match="dtype="):
        export_model(qat_model(**INT_W4), tmp_path / "o", dtype="int8", log=None)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import hf_cage.export.api as api

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(api, "build_model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(qat_model(**INT_W4), tmp_path / "out", progress=False, log=None)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_between_the_renames_restores_the_previous_export(tmp_path, monkeypatch):
    import hf_cage.export.api as api

    out = tmp_path / "out"
    export_model(qat_model(**INT_W4), out, progress=False, log=None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rename = os.rename

    def interrupted_rename(src, dst):
        if Path(dst) == out and "staging" in Path(src).name:
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(api.os, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        export_model(qat_model(seed=1, **INT_W4), out, overwrite=True, progress=False, log=None)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_os_error_while_writing_is_one_export_write_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import huggingface_hub

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "save_torch_state_dict", full_disk)
    with pytest.raises(ExportWriteError, match="No space left on device") as info:
        export_model(qat_model(**INT_W4), tmp_path / "out", progress=False, log=None)
    assert info.value.errno == errno.ENOSPC and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_folders_of_dead_exports_are_removed_and_nothing_else(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = [
        tmp_path / f".out.hf-cage-staging-{dead_pid}-0badf00d",
        tmp_path / f".old.hf-cage-old-{dead_pid}-12345678",
    ]
    kept = [
        tmp_path / f".out.hf-cage-staging-{os.getpid()}-0badf00d",  # a live export
        tmp_path / ".out.tmp-abc123",  # not this tool's name
        tmp_path / f"out.hf-cage-staging-{dead_pid}-0badf00d",  # not hidden: not ours
    ]
    for folder in stale + kept:
        (folder / "model.safetensors").parent.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    export_model(qat_model(**INT_W4), tmp_path / "out", progress=False, log=None)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)])
def test_export_folder_mode_follows_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        export_model(qat_model(**INT_W4), tmp_path / "out", progress=False, log=None)
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == mode
    files = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in files and set(files.values()) == {mode & 0o666}  # safetensors alone wrote 0600


def test_safetensors_write_error_is_an_export_write_error_and_leaves_no_folder(tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError (not an OSError): exit 3's error, parents removed too."""
    import errno

    import huggingface_hub
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(huggingface_hub, "save_torch_state_dict", full_disk)
    with pytest.raises(ExportWriteError, match="No space left on device") as info:
        export_model(qat_model(**INT_W4), tmp_path / "a" / "b" / "out", progress=False, log=None)
    assert info.value.errno == errno.ENOSPC and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(3, 8), (5, 64), (2, 3, 128)])
def test_pack_int4_bytewise_matches_the_kernel_packing(shape):
    from hf_cage.kernels import pack_int4

    codes = torch.randint(-8, 8, shape, generator=torch.Generator().manual_seed(2), dtype=torch.int8)
    assert torch.equal(pack_codes(codes, 4), pack_int4(codes))
    assert torch.equal(unpack_codes(pack_codes(codes, 4), 4), codes)
    with pytest.raises(ValueError, match="must lie in"):
        pack_codes(torch.full((1, 8), 8, dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(torch.zeros(1, 12, dtype=torch.int8), 4)


def test_public_api_reexports_export():
    import hf_cage
    import hf_cage.export

    assert hf_cage.export_model is hf_cage.export.export_model
    assert hf_cage.export_checkpoint is hf_cage.export.export_checkpoint
    assert hf_cage.load_quantized is hf_cage.export.load_quantized


def test_export_benchmark_runs_on_the_micro_preset(tmp_path, capsys, import_benchmark):
    bench = import_benchmark("export")
    assert bench.main(["--preset", "micro", "--repeats", "1", "--output", str(tmp_path / "table.md")]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "bit-identical between the two exports: yes" in table and "| dense bf16" in table

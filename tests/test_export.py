"""export_model / load_quantized on tiny Llamas: packing, formats, exactness, the card and bad inputs."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from hf_cage import Int4Linear, QuantConfig, quantize_model, quantized_layers
from hf_cage.export import CardOptions, ExportError, TrainingInfo, export_model, load_quantized
from hf_cage.kernels.packing import pack_codes, unpack_codes
from hf_cage.qat import CONFIG_KEY

INT_W4 = dict(quantizer="int", a_bits=None)
INT_W4A4_GROUP = dict(quantizer="int", a_bits=4, granularity="group", group_size=32)
QUEST_W4A4 = dict(quantizer="quest", a_bits=4)


# ----------------------------------------------------------------------------- helpers shared by the export tests
def qat_model(seed: int = 0, **quant) -> torch.nn.Module:
    """A tiny quantized Llama whose weights are bf16-representable (so a bf16 export of the dense rest is exact)."""
    model = make_tiny_llama(seed)
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


# ----------------------------------------------------------------------------- compressed-tensors
def test_compressed_tensors_export_is_bit_exact(tmp_path):
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    model = qat_model(**INT_W4A4_GROUP)
    result = export_model(model, tmp_path / "out", progress=False, log=None)
    out = tmp_path / "out"
    assert result.num_layers == 14 and result.size_bytes < result.bf16_size_bytes
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
        "strategy": "group",
        "group_size": 32,
        "dynamic": False,
    }
    assert group["input_activations"]["num_bits"] == 4 and group["input_activations"]["dynamic"] is True
    assert group["input_activations"]["strategy"] == "token"
    assert config["dtype"] == "bfloat16" and config[CONFIG_KEY]["quantizer"] == "int"

    tensors = load_file(out / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    for name, layer in quantized_layers(model):
        assert f"{name}.weight" not in tensors
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        assert packed.dtype == torch.int32 and packed.shape == (layer.out_features, layer.in_features // 8)
        assert scale.dtype == torch.float32 and scale.shape == (layer.out_features, layer.in_features // 32)
        assert tensors[f"{name}.weight_shape"].tolist() == [layer.out_features, layer.in_features]
        codes = unpack_codes(packed, 4).float().reshape(layer.out_features, -1, 32)
        dequantized = (codes * scale.unsqueeze(-1)).reshape(layer.out_features, layer.in_features)
        torch.testing.assert_close(dequantized, layer.weight_quantizer(), atol=0, rtol=0)


def test_weights_only_drops_activations_and_channel_scales(tmp_path):
    model = qat_model(quantizer="int", a_bits=4)
    export_model(model, tmp_path / "out", weights_only=True, progress=False, log=None)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"] is None
    assert group["weights"]["strategy"] == "channel" and group["weights"]["group_size"] is None
    assert config["hf_cage_export"]["weights_only"] is True


def test_int8_export_loads_in_transformers_exactly(tmp_path, token_batch):
    from transformers import AutoModelForCausalLM

    model = qat_model(quantizer="int", w_bits=8, a_bits=None)
    export_model(model, tmp_path / "out", progress=False, log=None)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    # compressed-tensors unpacks the weights on the first forward pass
    torch.testing.assert_close(logits(loaded, token_batch), logits(model, token_batch), atol=1e-5, rtol=0)
    for name, layer in quantized_layers(model):
        torch.testing.assert_close(loaded.get_submodule(name).weight, layer.weight_quantizer(), atol=0, rtol=0)
    with pytest.raises(ValueError, match="w_bits=8"):
        load_quantized(tmp_path / "out")


# ----------------------------------------------------------------------------- load_quantized
@pytest.mark.parametrize(
    "quant, fmt",
    [(INT_W4A4_GROUP, "compressed-tensors"), (QUEST_W4A4, "hf-cage"), (dict(quantizer="int", a_bits=8), "hf-cage")],
    ids=["int-group-ct", "quest-hadamard-hfcage", "int-w4a8-hfcage"],
)
def test_load_quantized_reproduces_the_qat_model(tmp_path, token_batch, quant, fmt):
    model = qat_model(**quant)
    export_model(model, tmp_path / "out", format=fmt, dtype="float32", progress=False, log=None)
    loaded = load_quantized(tmp_path / "out", dtype=torch.float32)
    names = [name for name, _ in quantized_layers(model)]
    assert names and all(isinstance(loaded.get_submodule(n), Int4Linear) for n in names)
    for name, layer in quantized_layers(model):
        packed = loaded.get_submodule(name)
        torch.testing.assert_close(packed.dequantized_weight(), layer.weight_quantizer(), atol=0, rtol=0)
        assert packed.activation_spec == layer.activation_spec
    torch.testing.assert_close(logits(loaded, token_batch), logits(model, token_batch), atol=1e-5, rtol=0)


def test_hf_cage_format_carries_its_metadata_and_no_transformers_quantizer(tmp_path):
    export_model(qat_model(**QUEST_W4A4), tmp_path / "out", format="hf-cage", progress=False, log=None)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    meta = config["hf_cage_export"]
    assert meta["format"] == "hf-cage" and meta["weight_grid"] == "midrise" and meta["code_offset"] == 0.5
    assert meta["hadamard"] is True and config[CONFIG_KEY]["quantizer"] == "quest"


def test_tied_embeddings_are_stored_once_and_retied(tmp_path, token_batch):
    model = make_tiny_llama(0, tie_word_embeddings=True)
    quantize_model(model, QuantConfig(**INT_W4))
    export_model(model, tmp_path / "out", dtype="float32", progress=False, log=None)
    loaded = load_quantized(tmp_path / "out", dtype=torch.float32)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(loaded, token_batch), logits(model, token_batch), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- lossy or loud
def test_quest_model_to_compressed_tensors_is_refused_naming_hf_cage(tmp_path):
    with pytest.raises(ExportError, match="--format hf-cage"):
        export_model(qat_model(**QUEST_W4A4), tmp_path / "out", progress=False, log=None)
    assert not (tmp_path / "out").exists()


def test_allowed_lossy_conversion_reports_its_error(tmp_path):
    lines = []
    model = qat_model(**QUEST_W4A4)
    result = export_model(model, tmp_path / "out", allow_lossy=True, progress=False, log=lines.append)
    report = result.lossy
    assert 0 < report["weight_rel_error"] < 0.5
    assert report["logit_max_abs_diff"] > 0 and report["logit_mean_abs_diff"] > 0
    assert len(lines) == 1 and "relative weight error" in lines[0] and "logit difference" in lines[0]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config[CONFIG_KEY]["quantizer"] == "int" and config[CONFIG_KEY]["hadamard"] is False
    assert config["hf_cage_export"]["lossy_conversion_from"]["quantizer"] == "quest"
    assert "Lossy conversion" in (tmp_path / "out" / "README.md").read_text()


# ----------------------------------------------------------------------------- model card
def test_card_has_metadata_training_summary_and_loss_curve(tmp_path):
    from huggingface_hub import ModelCard

    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4A4_GROUP), metrics=METRICS)
    from hf_cage.export import load_checkpoint

    model = load_checkpoint(ckpt)
    options = CardOptions(repo_id="me/tiny-cage", base_model="meta-llama/Llama-3.2-1B", datasets=["allenai/c4"])
    result = export_model(
        model, tmp_path / "out", training=TrainingInfo.from_dir(ckpt), card=options, progress=False, log=None
    )
    out = tmp_path / "out"
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(result.files)
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["base_model"] == "meta-llama/Llama-3.2-1B"
    assert {"hf-cage", "cage", "qat", "int4"} <= set(data["tags"])
    assert data["license"] == "apache-2.0" and data["pipeline_tag"] == "text-generation"
    assert data["datasets"] == ["allenai/c4"]
    text = card.text
    for expected in [
        "| Weights | 4-bit, integer grid, per group (group size 32) |",
        "| CAGE lambda | 10 |",
        "| CAGE silence ratio | 0.8 |",
        "| final eval loss | 2.5 |",
        "| final eval perplexity | 12.18 |",
        "| training tokens | 81,920 |",
        "| ste | 2.61 |",
        "![loss curve](loss_curve.png)",
        'AutoModelForCausalLM.from_pretrained("me/tiny-cage")',
        "from vllm import LLM",
        "hf_cage.load_quantized",
        "arXiv:2510.18784",
    ]:
        assert expected in text, expected


def test_card_without_training_logs_has_no_training_section(tmp_path):
    export_model(qat_model(**INT_W4), tmp_path / "out", progress=False, log=None)
    text = (tmp_path / "out" / "README.md").read_text()
    assert "## Training" not in text and "loss_curve" not in text
    assert not (tmp_path / "out" / "loss_curve.png").exists()


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directories left


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: make_tiny_llama(0), "no quantized layers"),
        (lambda: qat_model(quantizer="int", w_bits=2, a_bits=None), "w_bits=2"),
        (lambda: qat_model(quantizer="int", w_bits=3, a_bits=None), "w_bits=3"),
        (lambda: qat_model(quantizer="int", a_bits=3), "a_bits=3"),
        (lambda: quantize_model(make_tiny_llama(0, intermediate_size=100), QuantConfig(**INT_W4)), "multiple of 8"),
    ],
    ids=["dense", "w2", "w3", "a3", "in-features-100"],
)
def test_models_the_format_cannot_hold_are_refused(tmp_path, build, match):
    with pytest.raises(ExportError, match=match):
        export_model(build(), tmp_path / "out", progress=False, log=None)
    assert list(tmp_path.iterdir()) == []


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
    assert hf_cage.load_quantized is hf_cage.export.load_quantized


def test_export_benchmark_runs_on_the_micro_preset(tmp_path, capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "export.py"
    spec = importlib.util.spec_from_file_location("export_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--preset", "micro", "--repeats", "1", "--output", str(tmp_path / "table.md")]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "bit-identical between the two exports: yes" in table and "| dense bf16" in table

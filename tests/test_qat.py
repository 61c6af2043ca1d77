"""quantize_model, QATLinear and the save / load round trip on a tiny Llama."""

import json

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

from hf_cage import (
    Int4Linear,
    QATLinear,
    QuantConfig,
    load_qat_model,
    quant_config_of,
    quantize_model,
    quantized_layers,
)
from hf_cage.qat import CONFIG_KEY

BLOCK_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_quantize_model_swaps_exactly_the_seven_block_linears(tiny_llama):
    embed, head = tiny_llama.model.embed_tokens, tiny_llama.lm_head
    quantize_model(tiny_llama, QuantConfig(w_bits=4, a_bits=4))
    names = [name for name, _ in quantized_layers(tiny_llama)]
    assert len(names) == 7 * tiny_llama.config.num_hidden_layers
    for layer_index in range(tiny_llama.config.num_hidden_layers):
        in_block = {n.rsplit(".", 1)[-1] for n in names if n.startswith(f"model.layers.{layer_index}.")}
        assert in_block == BLOCK_LINEARS
    assert type(tiny_llama.lm_head) is nn.Linear and tiny_llama.lm_head is head
    assert tiny_llama.model.embed_tokens is embed


def test_quantized_model_shares_parameters_and_backpropagates(tiny_llama, token_batch):
    q_weight = tiny_llama.model.layers[0].self_attn.q_proj.weight
    quantize_model(tiny_llama, QuantConfig())
    assert tiny_llama.model.layers[0].self_attn.q_proj.weight is q_weight
    loss = tiny_llama(input_ids=token_batch, labels=token_batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    for _, layer in quantized_layers(tiny_llama):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_quantization_changes_the_outputs(tiny_llama, token_batch):
    dense = tiny_llama(input_ids=token_batch).logits
    quantized = quantize_model(tiny_llama, QuantConfig(w_bits=2, a_bits=2))(input_ids=token_batch).logits
    assert not torch.allclose(dense, quantized)


def test_qat_linear_forward_is_linear_of_quantized_inputs_and_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = QATLinear.from_linear(linear, QuantConfig(quantizer="int", a_bits=8))
    x = torch.randn(5, 64)
    from hf_cage.kernels import fake_quantize

    expected = nn.functional.linear(fake_quantize(x, layer.activation_spec)[0], layer.weight_quantizer(), linear.bias)
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)
    assert layer.to_linear().weight is linear.weight and layer.to_linear().bias is linear.bias


def test_weight_quantizer_takes_any_weight_and_builds_no_graph():
    layer = QATLinear.from_linear(nn.Linear(64, 16), QuantConfig())
    w = torch.randn(16, 64, requires_grad=True)
    q = layer.weight_quantizer(w)
    assert q.shape == w.shape and not q.requires_grad


def test_nothing_to_quantize_is_a_clear_error():
    model = nn.Sequential(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="no linear layer matched"):
        quantize_model(model, QuantConfig())


def test_shape_that_does_not_fit_the_group_is_a_clear_error_and_changes_nothing():
    model = make_tiny_llama(intermediate_size=96)
    with pytest.raises(ValueError, match="down_proj.*group_size=64 does not divide in_features=96"):
        quantize_model(model, QuantConfig(granularity="group", group_size=64))
    assert not list(quantized_layers(model))


def test_quantizing_twice_is_refused(tiny_llama):
    quantize_model(tiny_llama, QuantConfig())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(tiny_llama, QuantConfig())


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(quantizer="int", granularity="group", group_size=32)])
def test_save_and_load_qat_model_gives_identical_logits(tiny_llama, token_batch, tmp_path, config):
    quantize_model(tiny_llama, config)
    expected = tiny_llama(input_ids=token_batch).logits
    tiny_llama.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY] == config.to_dict()
    loaded = load_qat_model(tmp_path).eval()
    assert quant_config_of(loaded) == config
    torch.testing.assert_close(loaded(input_ids=token_batch).logits, expected, atol=0, rtol=0)


def test_load_qat_model_errors(tiny_llama, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_qat_model(tmp_path / "missing")
    tiny_llama.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no hf-cage quantization config"):
        load_qat_model(tmp_path)


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(quantizer="int", granularity="group", group_size=32)])
def test_int4_linear_packs_a_trained_layer_and_reproduces_its_forward(config):
    torch.manual_seed(0)
    layer = QATLinear.from_linear(nn.Linear(128, 48), config)
    packed = Int4Linear.from_qat_linear(layer)
    assert packed.weight_packed.dtype == torch.int32 and packed.weight_packed.shape == (48, 16)
    torch.testing.assert_close(packed.dequantized_weight(), layer.weight_quantizer(), atol=0, rtol=0)
    x = torch.randn(3, 128)
    torch.testing.assert_close(packed(x), layer(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="4-bit"):
        Int4Linear.from_qat_linear(QATLinear.from_linear(nn.Linear(128, 48), QuantConfig(w_bits=3)))


def test_load_qat_model_leaves_the_architecture_class_alone(tiny_llama, token_batch, tmp_path, monkeypatch, caplog):
    """The quantized layers' buffers are declared expected on a throwaway subclass, not on LlamaForCausalLM
    (global state shared by every load and thread); the model comes back as a plain LlamaForCausalLM."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    quantize_model(tiny_llama, QuantConfig(quantizer="nvfp4"))
    tiny_llama(input_ids=token_batch)  # calibrate the NVFP4 input global scales (train mode)
    tiny_llama.eval()
    expected = tiny_llama(input_ids=token_batch).logits
    tiny_llama.save_pretrained(tmp_path / "saved")
    before = LlamaForCausalLM.__dict__.get("_keys_to_ignore_on_load_unexpected")
    seen = []
    post_init = LlamaForCausalLM.post_init

    def spy(self):
        seen.append(LlamaForCausalLM.__dict__.get("_keys_to_ignore_on_load_unexpected"))
        post_init(self)

    monkeypatch.setattr(LlamaForCausalLM, "post_init", spy)
    hf_logging.enable_propagation()
    try:
        loaded = load_qat_model(tmp_path / "saved").eval()
    finally:
        hf_logging.disable_propagation()
    assert seen and all(keys == before for keys in seen)  # never modified, even while loading
    assert type(loaded) is LlamaForCausalLM
    torch.testing.assert_close(loaded(input_ids=token_batch).logits, expected, atol=0, rtol=0)
    assert "input_global_scale" not in caplog.text  # not reported as an unexpected key
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

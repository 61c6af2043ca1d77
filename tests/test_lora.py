"""peft LoRA on a quantized tiny Llama: adapters wrap QATLinear, only they train, save/load and merge round-trip."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from hf_cage import Int4Linear, QATLinear, QuantConfig, load_qat_model, quantize_model, quantized_layers
from hf_cage.quant import LLAMA_TARGET_MODULES

peft = pytest.importorskip("peft")


def quantized_lora_model(seed: int = 0):
    model = quantize_model(make_tiny_llama(seed), QuantConfig(w_bits=4, a_bits=4))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_TARGET_MODULES), task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def train_adapters(model, batch: torch.Tensor, steps: int = 3) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_peft_wraps_every_qat_linear_and_trains_only_adapters(token_batch):
    model = quantized_lora_model()
    wrapped = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(wrapped) == 2 * len(LLAMA_TARGET_MODULES)
    assert all(isinstance(m.get_base_layer(), QATLinear) for m in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_adapters(model, token_batch)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen {name} changed"
    assert any(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters)


def test_adapter_forward_is_quantized_base_plus_full_precision_adapter(token_batch):
    model = quantized_lora_model()
    train_adapters(model, token_batch, steps=1)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    base = layer.get_base_layer()
    adapter = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    torch.testing.assert_close(layer(x), base(x) + adapter)
    assert not torch.allclose(adapter, torch.zeros_like(adapter))


def test_save_and_load_through_peft_gives_identical_logits(tmp_path, token_batch):
    model = quantized_lora_model(seed=0)
    train_adapters(model, token_batch)
    with torch.no_grad():
        expected = model(input_ids=token_batch).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()

    base = quantize_model(make_tiny_llama(seed=0), QuantConfig(w_bits=4, a_bits=4))
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        got = reloaded(input_ids=token_batch).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_merge_folds_adapters_into_weights_and_requantizes(tmp_path, token_batch):
    model = quantized_lora_model()
    train_adapters(model, token_batch)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    expected_weight = layer.get_base_layer().weight.detach() + layer.get_delta_weight("default")
    with torch.no_grad():
        unmerged = model(input_ids=token_batch).logits

    merged = model.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    layers = dict(quantized_layers(merged))
    assert len(layers) == 2 * len(LLAMA_TARGET_MODULES)
    new = layers["model.layers.1.mlp.down_proj"]
    torch.testing.assert_close(new.weight.detach(), expected_weight)
    # The merged layer quantizes the merged weight in its forward: output is F.linear(Qa(x), Qw(W + dW)).
    x = torch.randn(2, new.in_features, generator=torch.Generator().manual_seed(1))
    reference = QATLinear.from_linear(torch.nn.Linear(new.in_features, new.out_features, bias=False), new.quant_config)
    reference.weight = torch.nn.Parameter(expected_weight.clone())
    torch.testing.assert_close(new(x), reference(x))
    with torch.no_grad():
        merged_logits = merged(input_ids=token_batch).logits
    # Re-quantizing the merged weight is not the same model as a full-precision adapter beside a quantized base.
    assert not torch.equal(merged_logits, unmerged)
    assert torch.isfinite(merged_logits).all()

    merged.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = load_qat_model(tmp_path, dtype=torch.float32).eval()(input_ids=token_batch).logits
    torch.testing.assert_close(reloaded, merged_logits, atol=0, rtol=0)


def test_merging_untrained_adapters_changes_nothing(token_batch):
    model = quantized_lora_model().eval()
    with torch.no_grad():
        before = model(input_ids=token_batch).logits
        after = model.merge_and_unload()(input_ids=token_batch).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def int4_model(seed: int = 0):
    """A tiny Llama whose block linears are packed ``Int4Linear`` layers (what an exported checkpoint loads into)."""
    model = quantize_model(make_tiny_llama(seed), QuantConfig(w_bits=4, a_bits=4))
    for name, layer in list(quantized_layers(model)):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int4Linear.from_qat_linear(layer))
    return model


def int4_lora_config():
    from hf_cage.lora import register_int4_lora

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_TARGET_MODULES), task_type="CAUSAL_LM")
    return register_int4_lora(config)


@pytest.mark.filterwarnings("ignore:Unsupported layer type")
def test_lora_on_int4_linear_trains_saves_loads_and_merges(tmp_path, token_batch):
    from hf_cage.lora import Int4LoraLinear

    model = peft.get_peft_model(int4_model(), int4_lora_config())
    wrapped = [m for m in model.modules() if isinstance(m, Int4LoraLinear)]
    assert len(wrapped) == 2 * len(LLAMA_TARGET_MODULES)
    packed = {n: b.clone() for n, b in model.named_buffers() if "weight_packed" in n or "weight_scale" in n}
    train_adapters(model, token_batch)
    assert all(torch.equal(b, packed[n]) for n, b in model.named_buffers() if n in packed)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        expected = model(input_ids=token_batch).logits

    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(int4_model(), tmp_path, config=int4_lora_config()).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=token_batch).logits, expected, atol=0, rtol=0)

    layer = wrapped[0]
    base = layer.get_base_layer()
    target = base.dequantized_weight() + layer.get_delta_weight("default")
    merged = model.merge_and_unload()
    assert not any(isinstance(m, Int4LoraLinear) for m in merged.modules())
    assert sum(isinstance(m, Int4Linear) for m in merged.modules()) == 2 * len(LLAMA_TARGET_MODULES)
    # The merged codes are the int4 quantization of (dequantized base + adapter delta).
    requantized = QATLinear.from_linear(torch.nn.Linear(base.in_features, base.out_features, bias=False),
                                        QuantConfig(w_bits=4, a_bits=4)).weight_quantizer(target)  # fmt: skip
    torch.testing.assert_close(base.dequantized_weight(), requantized, atol=0, rtol=0)
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids=token_batch).logits).all()

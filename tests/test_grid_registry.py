"""The grid registry: a grid is one registered object, wired through training, export and loading.

A throwaway 4-bit grid defined here (nothing outside this file knows it) trains with ``CAGETrainer``, exports in
the hf-cage format and loads back with ``load_quantized`` to the trained logits, exactly; every registered grid
goes through the same path.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from test_trainer import Blocks, config

from hf_cage import CAGETrainer, QuantConfig, QuantSpec, load_quantized
from hf_cage.export import export_model
from hf_cage.kernels import Grid, get_grid, grid_names, register_grid, registered_grid
from hf_cage.layers.packed import PackedLinear
from hf_cage.qat import EXPORT_KEY


def _codes_and_step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """15 levels ``code * step``, codes in ``[-7, 7]``, ``step = absmax(row) / 7``."""
    x = x.float()
    step = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 7
    return torch.round(x / step).clamp(-7, 7), step


class SymmetricGrid(Grid):
    """A trivial 4-bit grid: one int8 code per input, one fp32 scale per row or token, no Triton kernel."""

    name = "sym15"
    description = "15 symmetric levels, absmax per row"
    bits = (4,)
    fixed_scale_rule = "absmax"
    packing = "sym15: one int8 code per input, an fp32 step per row"
    card_name = "sym15 (15 symmetric levels)"

    def spec_problem(self, spec):
        return super().spec_problem(spec) or ("sym15 takes no rotation or group" if spec.hadamard_block else None)

    def fake_quantize(self, x, spec, backend, global_scale=None):
        codes, step = _codes_and_step(x)
        return (codes * step).to(x.dtype), torch.ones(x.shape, dtype=torch.bool, device=x.device)

    def pack(self, weight, spec, backend):
        codes, step = _codes_and_step(weight)
        return {"weight_packed": codes.to(torch.int8), "weight_scale": step.squeeze(-1)}

    def unpack(self, tensors, spec, dtype):
        return (tensors["weight_packed"].float() * tensors["weight_scale"].unsqueeze(-1)).to(dtype)

    def packed_buffers(self, out_features, in_features, spec, device=None):
        return {
            "weight_packed": torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
            "weight_scale": torch.ones(out_features, dtype=torch.float32, device=device),
        }


def train(tmp_path, **quant):
    """A tiny Llama after 3 CAGETrainer steps on ``QuantConfig(**quant)`` (correction active), in eval mode."""
    fields = {f"quant_{k}": v for k, v in quant.items()}
    model = make_tiny_llama()
    CAGETrainer(model, config(tmp_path / "run", cage_silence_ratio=0.0, **fields), train_dataset=Blocks()).train()
    return model.eval()


def assert_export_loads_as_trained(model, path, fmt: str) -> dict:
    """Export ``model`` with ``fmt``, load it with ``load_quantized``: the logits equal the trained model's."""
    export_model(model, path, format=fmt, progress=False, log=None)
    loaded = load_quantized(path)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    return loaded


def test_a_throwaway_grid_trains_exports_and_loads_through_the_registry(tmp_path):
    with registered_grid(SymmetricGrid()):
        model = train(tmp_path, quantizer="sym15", w_bits=4, a_bits=4)
        layer = model.model.layers[0].self_attn.q_proj
        assert layer.weight_spec == QuantSpec(4, "sym15", "absmax") and layer.activation_spec.grid == "sym15"
        loaded = assert_export_loads_as_trained(model, tmp_path / "auto", "auto")  # auto: only hf-cage holds it
        packed = loaded.model.layers[0].self_attn.q_proj
        assert type(packed) is PackedLinear and packed.weight_packed.dtype == torch.int8
        config = json.loads((tmp_path / "auto" / "config.json").read_text())
        assert config[EXPORT_KEY]["format"] == "hf-cage"
        assert config[EXPORT_KEY]["packing"] == SymmetricGrid.packing
        assert "sym15 (15 symmetric levels)" in (tmp_path / "auto" / "README.md").read_text()
    assert "sym15" not in grid_names()  # the registration is undone
    with pytest.raises(ValueError, match="grid 'sym15' is not registered; choose one of 'int'"):
        QuantSpec(4, "sym15", "absmax")


@pytest.mark.parametrize("name", grid_names())
def test_every_registered_grid_is_wired_through_training_export_and_loading(tmp_path, name):
    model = train(tmp_path, quantizer=name, w_bits=4, a_bits=4)
    for fmt in ("hf-cage", "auto"):
        assert_export_loads_as_trained(model, tmp_path / fmt, fmt)


def test_unknown_and_taken_names_are_loud_errors():
    with pytest.raises(ValueError, match="quantizer='nf4' is not supported; allowed values: .*'int'.*'quest'"):
        QuantConfig(quantizer="nf4")
    with pytest.raises(ValueError, match="grid 'nf4' is not registered; choose one of .*'mxfp4'"):
        get_grid("nf4")
    with pytest.raises(ValueError, match="cannot register grid 'int'"):
        register_grid(get_grid("int"))
    assert "int" in grid_names()  # a refused registration changes nothing


def test_legacy_grid_names_are_read_as_the_one_vocabulary():
    assert QuantSpec(4, "midrise") == QuantSpec(4, "quest") and QuantSpec(4, "integer").grid == "int"
    assert QuantConfig(quantizer="int", a_bits=4).weight_spec(64) == QuantSpec(4, "int", "mse")
    assert get_grid("quest").legacy_name == "midrise"  # what the export metadata's weight_grid still says

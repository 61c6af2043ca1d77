"""What you train is what you serve: trained ``int`` models (8, 4, 3 and 2 bits) exported with defaults, loaded by
stock transformers.

The stock side runs in a separate process that never imports hf_cage (``hf_cage.export.served``), loading
each export with ``AutoModelForCausalLM.from_pretrained(dtype=torch.float32)``. The contract of issue 9 is a
max abs logit difference below 1e-3; what is measured is exact equality (0.0): the weights dequantize to
the trained ``Q(W)`` bit for bit, activations follow the trained ``a_clip="minmax"`` rule, which is
compressed-tensors' own, bit for bit, and the dense parts are stored in the trained dtype. So the tests
assert exact equality, the stronger form of the contract.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import trained_checkpoint

from hf_cage import load_qat_model
from hf_cage.export import export_checkpoint, load_quantized
from hf_cage.export.served import served_eval_many

CASES = {
    "w4a4-channel": dict(w_bits=4, a_bits=4),
    "w4a4-group32": dict(w_bits=4, a_bits=4, granularity="group", group_size=32),
    "w8a8-channel": dict(w_bits=8, a_bits=8),
    "w8a8-group32": dict(w_bits=8, a_bits=8, granularity="group", group_size=32),
    "w4a4-group128": dict(w_bits=4, a_bits=4, granularity="group", group_size=128),
    # Sub-4-bit weights (packed densely across int32 words by compressed-tensors' own pack_to_int32), weight-only
    # per channel and per group, and with activations of the same width (compressed-tensors' dynamic per-token
    # rule takes any width; vLLM's kernels take 4- and 8-bit ones only).
    "w3a16-channel": dict(w_bits=3, a_bits=None),
    "w3a16-group32": dict(w_bits=3, a_bits=None, granularity="group", group_size=32),
    "w2a16-channel": dict(w_bits=2, a_bits=None),
    "w2a16-group64": dict(w_bits=2, a_bits=None, granularity="group", group_size=64),
    "w3a3-channel": dict(w_bits=3, a_bits=3),
    "w2a2-group32": dict(w_bits=2, a_bits=2, granularity="group", group_size=32),
}


def test_trained_int_models_exported_with_defaults_serve_exactly_as_trained(tmp_path):
    batch = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(7))
    trained, exports = {}, []
    for seed, (name, quant) in enumerate(CASES.items()):
        model = trained_checkpoint(tmp_path / "runs" / name, seed, quantizer="int", **quant)
        assert model.config.hf_cage_quantization["a_clip"] == "minmax"  # a_clip left at the int default
        with torch.no_grad():
            trained[name] = model(input_ids=batch, labels=batch)
        # the checkpoint as reloaded is the trained model, bit for bit
        with torch.no_grad():
            again = load_qat_model(tmp_path / "runs" / name)(input_ids=batch).logits
        assert torch.equal(again, trained[name].logits)
        result = export_checkpoint(tmp_path / "runs" / name, tmp_path / "exports" / name, progress=False, log=None)
        assert result.format == "compressed-tensors" and result.dtype == "float32"
        assert result.parity["logit_max_abs_diff"] == 0  # hf-cage's own measurement says so too
        config = json.loads((tmp_path / "exports" / name / "config.json").read_text())
        group = config["quantization_config"]["config_groups"]["group_0"]
        assert group["weights"]["num_bits"] == quant["w_bits"] and group["format"] == "pack-quantized"
        activations = group["input_activations"]
        assert (activations or {}).get("num_bits") == quant["a_bits"]
        assert activations is None or activations["dynamic"] is True
        exports.append(tmp_path / "exports" / name)
    with pytest.raises(ValueError, match="w_bits=3.*AutoModelForCausalLM"):
        load_quantized(tmp_path / "exports" / "w3a3-channel")  # packed layers hold 4 bits; transformers reads these

    served = served_eval_many(exports, batch, logits=True, loss=True)
    for (name, reference), result in zip(trained.items(), served):
        diff = (result.logits - reference.logits).abs().max().item()
        assert diff < 1e-3, (name, diff)  # issue 9's contract ...
        assert diff == 0.0, (name, diff)  # ... and what holds: exact
        assert result.loss == pytest.approx(reference.loss.item(), abs=1e-6), name


def test_served_eval_refuses_what_stock_transformers_cannot_load(tmp_path):
    from test_export import QUEST_W4A4, qat_model

    from hf_cage.export import export_model

    export_model(qat_model(**QUEST_W4A4), tmp_path / "quest", progress=False, log=None)
    with pytest.raises(ValueError, match="hf-cage format export.*load_quantized"):
        served_eval_many([tmp_path / "quest"], torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="no readable config.json"):
        served_eval_many([tmp_path / "nothing"], torch.zeros(1, 4, dtype=torch.long))

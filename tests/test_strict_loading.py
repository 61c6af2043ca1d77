"""Loading is strict everywhere: every hf-cage path that reads a model refuses a checkpoint whose tensors do not match
the model it describes, and a packed export where a training checkpoint is expected (issue 18, section 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_export import INT_W4, INT_W4A4_GROUP, QUEST_W4A4, logits, qat_model, save_checkpoint

import hf_cage
from hf_cage.cli import main
from hf_cage.export import ExportError, export_checkpoint, load_quantized
from hf_cage.qat import CheckpointError

DELETED = "model.layers.0.mlp.down_proj.weight"


def export(*argv: str) -> int:
    return main(["export", *argv, "--no-progress"])


def edit_weights(folder: Path, drop: str | None = None, add: str | None = None) -> None:
    """Rewrite ``folder/model.safetensors`` without the tensor ``drop`` / with an extra tensor ``add``."""
    state = load_file(folder / "model.safetensors")
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(3)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-cage export: error: "), lines
    return lines[0]


@pytest.fixture
def run_and_export(tmp_path):
    """A QAT Trainer checkpoint (``RUN/checkpoint-10``) and its export ``A`` (compressed-tensors)."""
    model = qat_model(wide=True, **INT_W4A4_GROUP)
    ckpt = save_checkpoint(tmp_path / "RUN", model)
    export_checkpoint(ckpt, tmp_path / "A", progress=False, log=None)
    return model, ckpt, tmp_path / "A"


def test_exporting_an_export_is_refused_with_how_to_load_it(tmp_path, run_and_export, capsys):
    _, _, exported = run_and_export
    capsys.readouterr()
    assert export(str(exported), "-o", str(tmp_path / "B")) == 2
    line = one_error_line(capsys)
    assert "is a packed hf-cage export (format compressed-tensors)" in line
    assert "hf_cage.load_quantized(path)" in line and "AutoModelForCausalLM" in line
    assert not (tmp_path / "B").exists()


def test_load_qat_model_refuses_an_export_instead_of_initializing_its_blocks(tmp_path, run_and_export):
    with pytest.raises(CheckpointError, match="packed hf-cage export.*load_quantized"):
        hf_cage.load_qat_model(run_and_export[2])
    quest = qat_model(**QUEST_W4A4)
    hf_cage.export_model(quest, tmp_path / "quest", progress=False, log=None)
    with pytest.raises(CheckpointError, match=r"format hf-cage\), not a training checkpoint") as info:
        hf_cage.load_qat_model(tmp_path / "quest")
    assert "AutoModelForCausalLM" not in str(info.value)  # stock loaders cannot read the hf-cage format


def test_a_deleted_tensor_is_named_by_export_and_load_qat_model(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "RUN", qat_model(**INT_W4))
    edit_weights(ckpt, drop=DELETED)
    with pytest.raises(CheckpointError, match=f"missing {DELETED}") as info:
        hf_cage.load_qat_model(ckpt)
    assert "\n" not in str(info.value)
    capsys.readouterr()
    assert export(str(ckpt), "-o", str(tmp_path / "out")) == 2
    assert f"missing {DELETED}" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_an_unexpected_tensor_is_named(tmp_path):
    ckpt = save_checkpoint(tmp_path / "RUN", qat_model(**INT_W4))
    edit_weights(ckpt, add="model.layers.0.mlp.extra_proj.weight")
    with pytest.raises(CheckpointError, match="unexpected model.layers.0.mlp.extra_proj.weight"):
        hf_cage.load_qat_model(ckpt)
    with pytest.raises(ExportError, match="unexpected model.layers.0.mlp.extra_proj.weight"):
        export_checkpoint(ckpt, tmp_path / "out", progress=False, log=None)


def test_load_quantized_names_a_deleted_packed_tensor_and_a_truncated_file(tmp_path, run_and_export):
    _, _, exported = run_and_export
    edit_weights(exported, drop="model.layers.1.self_attn.o_proj.weight_scale")
    with pytest.raises(CheckpointError, match="missing model.layers.1.self_attn.o_proj.weight_scale"):
        load_quantized(exported)
    data = (exported / "model.safetensors").read_bytes()
    (exported / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_quantized(exported)


def test_the_parity_check_measures_the_weights_on_disk(tmp_path, monkeypatch):
    """A loader that returned anything but the saved weights is caught, not certified "exact"."""
    import hf_cage.qat

    model = qat_model(**INT_W4)
    ckpt = save_checkpoint(tmp_path / "RUN", model)
    load = hf_cage.qat.load_qat_model

    def drifting_load(*args, **kwargs):
        loaded = load(*args, **kwargs)
        with torch.no_grad():
            loaded.get_submodule("model.layers.1.mlp.up_proj").weight.add_(1e-3)
        return loaded

    monkeypatch.setattr(hf_cage.qat, "load_qat_model", drifting_load)
    with pytest.raises(ExportError, match="differs from its saved tensor 'model.layers.1.mlp.up_proj.weight'"):
        export_checkpoint(ckpt, tmp_path / "out", progress=False, log=None)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(hf_cage.qat, "load_qat_model", load)
    result = export_checkpoint(ckpt, tmp_path / "out", progress=False, log=None)
    assert result.parity["logit_max_abs_diff"] == 0


def test_a_clean_checkpoint_still_loads_bit_for_bit(tmp_path, token_batch):
    """Strictness refuses nothing that is whole: tied embeddings (stored once) and sharded files load as saved."""
    from conftest import make_tiny_llama

    tied = hf_cage.quantize_model(make_tiny_llama(3, tie_word_embeddings=True), hf_cage.QuantConfig(**INT_W4))
    tied.save_pretrained(tmp_path / "tied", max_shard_size="40KB")
    assert (tmp_path / "tied" / "model.safetensors.index.json").is_file()
    again = hf_cage.load_qat_model(tmp_path / "tied")
    torch.testing.assert_close(logits(again, token_batch), logits(tied, token_batch), atol=0, rtol=0)

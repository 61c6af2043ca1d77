"""`hf-cage export` end to end: checkpoints on disk in, packed checkpoints out, plain transformers loading them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_export import (
    INT_W4,
    INT_W4A4_GROUP,
    METRICS,
    QUEST_W4A4,
    activations_unquantized,
    logits,
    qat_model,
    save_checkpoint,
)

from hf_cage.cli import build_parser, main
from hf_cage.export import load_quantized
from hf_cage.qat import CONFIG_KEY

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: loads each export with stock transformers and saves the logits.
PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
batch = torch.load(sys.argv[1])
out = {}
for path in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        out[path] = model(input_ids=batch).logits
assert not any(name == "hf_cage" or name.startswith("hf_cage.") for name in sys.modules), "hf_cage was imported"
torch.save(out, sys.argv[2])
"""


def export(*argv: str) -> int:
    return main(["export", *argv, "--no-progress"])


def test_exports_load_in_plain_transformers_without_hf_cage(tmp_path, token_batch):
    """W4 int (A16) and W4A4 int exported --weights-only: stock transformers gives the QAT model's W4A16 logits."""
    w4 = qat_model(1, **INT_W4)
    w4a4 = qat_model(2, **INT_W4A4_GROUP)
    assert export(str(save_checkpoint(tmp_path / "w4", w4)), "-o", str(tmp_path / "e-w4")) == 0
    ckpt = save_checkpoint(tmp_path / "w4a4", w4a4, trainer_checkpoint=False)
    assert export(str(ckpt), "-o", str(tmp_path / "e-w4a4"), "--weights-only") == 0

    torch.save(token_batch, tmp_path / "batch.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_CAGE")}
    paths = [str(tmp_path / "e-w4"), str(tmp_path / "e-w4a4")]
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt"), *paths],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    plain = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(plain[paths[0]], logits(w4, token_batch), atol=1e-5, rtol=0)
    with activations_unquantized(w4a4):
        torch.testing.assert_close(plain[paths[1]], logits(w4a4, token_batch), atol=1e-5, rtol=0)
    # ... and load_quantized restores the trained 4-bit activation quantization as well.
    loaded = load_quantized(tmp_path / "e-w4a4", dtype=torch.float32)
    torch.testing.assert_close(logits(loaded, token_batch), logits(w4a4, token_batch), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(w4a4, token_batch), plain[paths[1]], atol=1e-3)


def test_trainer_checkpoint_gets_tokenizer_card_and_loss_curve(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4A4_GROUP), metrics=METRICS)
    out = tmp_path / "export"
    assert export(str(ckpt), "--output-dir", str(out), "--base-model", "org/base", "--dataset", "allenai/c4") == 0
    files = {p.name for p in out.iterdir()}
    expected = {"config.json", "model.safetensors", "generation_config.json", "README.md", "loss_curve.png"}
    assert expected | {"tokenizer.json", "tokenizer_config.json"} <= files
    assert "optimizer.pt" not in files and "trainer_state.json" not in files
    printed = capsys.readouterr().out
    assert "exported 14 quantized layers" in printed and "of bf16" in printed
    card = (out / "README.md").read_text()
    assert "base_model: org/base" in card and "| CAGE lambda | 10 |" in card


def test_hf_cage_format_of_a_quest_model(tmp_path, token_batch):
    model = qat_model(**QUEST_W4A4)
    ckpt = save_checkpoint(tmp_path / "run", model, trainer_checkpoint=False)
    assert export(str(ckpt), "-o", str(tmp_path / "out"), "--format", "hf-cage", "--dtype", "float32") == 0
    loaded = load_quantized(tmp_path / "out")
    torch.testing.assert_close(logits(loaded, token_batch), logits(model, token_batch), atol=1e-5, rtol=0)


def test_lossy_conversion_prints_the_measured_error(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**QUEST_W4A4), trainer_checkpoint=False)
    capsys.readouterr()
    assert export(str(ckpt), "-o", str(tmp_path / "refused")) == 2
    err = capsys.readouterr().err
    assert "--format hf-cage" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()
    assert export(str(ckpt), "-o", str(tmp_path / "lossy"), "--allow-lossy") == 0
    printed = capsys.readouterr().out
    assert "relative weight error" in printed and "logit difference on a sample batch max" in printed


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = save_checkpoint(tmp_path / "good", qat_model(**INT_W4), trainer_checkpoint=False)
    config = json.loads((good / "config.json").read_text())
    dense = dict(config)
    dense.pop(CONFIG_KEY)
    no_weights = _write(tmp_path / "no-weights" / "config.json", json.dumps(config)).parent
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    _write(truncated / "config.json", json.dumps(config))
    (truncated / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:100])
    quest = save_checkpoint(tmp_path / "quest", qat_model(**QUEST_W4A4), trainer_checkpoint=False)
    two_bit = save_checkpoint(
        tmp_path / "w2", qat_model(quantizer="int", w_bits=2, a_bits=None), trainer_checkpoint=False
    )
    return {
        "missing": (tmp_path / "does-not-exist", "not found"),
        "no-config": (_write(tmp_path / "empty" / "x.txt", "").parent, "no config.json"),
        "malformed-config": (_write(tmp_path / "bad" / "config.json", "{not json").parent, "malformed"),
        "dense-model": (_write(tmp_path / "dense" / "config.json", json.dumps(dense)).parent, "no quantized layers"),
        "no-weights": (no_weights, "has no weights"),
        "truncated-weights": (truncated, "could not load the checkpoint"),
        "quest-to-compressed-tensors": (quest, "--format hf-cage"),
        "unsupported-bits": (two_bit, "w_bits=2"),
    }


BAD = [
    "missing",
    "no-config",
    "malformed-config",
    "dense-model",
    "no-weights",
    "truncated-weights",
    "quest-to-compressed-tensors",
    "unsupported-bits",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoints_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, case):
    path, message = _bad_checkpoints(tmp_path)[case]
    out = tmp_path / "out" / "export"
    before = sorted(p for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert export(str(path), "-o", str(out)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-cage export: error:") and message in lines[0], captured.err
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_non_empty_output_dir_and_overwrite(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), trainer_checkpoint=False)
    out = tmp_path / "out"
    _write(out / "old.txt", "keep me")
    assert export(str(ckpt), "-o", str(out)) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "old.txt").read_text() == "keep me"
    assert export(str(ckpt), "-o", str(out), "--overwrite") == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


def test_output_dir_cannot_be_the_checkpoint(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), trainer_checkpoint=False)
    before = sorted(p.name for p in ckpt.iterdir())
    assert export(str(ckpt), "-o", str(ckpt), "--overwrite") == 2
    assert "the checkpoint itself" in capsys.readouterr().err
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_push_without_a_token_exits_2_before_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), trainer_checkpoint=False)
    assert export(str(ckpt), "-o", str(tmp_path / "out"), "--push-to-hub", "me/model") == 2
    assert "token" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_explains_every_flag_with_examples(capsys):
    parser = build_parser()
    export_parser = parser._subparsers._group_actions[0].choices["export"]
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flags = [opt for action in export_parser._actions for opt in action.option_strings if opt.startswith("--")]
    assert len(flags) >= 17
    for action in export_parser._actions:
        assert action.help, action.option_strings
        for opt in action.option_strings:
            assert opt in text, opt
    assert "examples:" in text and "hf-cage export outputs/" in text and "--push-to-hub me/" in text
    assert "exit codes" in text


def test_top_level_cli_lists_export(capsys):
    assert main([]) == 0
    assert "export" in capsys.readouterr().out

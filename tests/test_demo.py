"""recipes/demo.py (the main job), through its seconds-long ``--smoke`` path: the same processes, branch, export
and report as ``make demo``, on a toy model and two small text files; what it prints is checked against what it
wrote and against an independent evaluation of the export."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from test_recipes import RECIPES, write_text

sys.path.insert(0, str(RECIPES))
demo = importlib.import_module("demo")
recipe_common = importlib.import_module("recipe_common")

STEPS = 10  # demo.SMOKE_ARGS
SILENCE = 0.8  # the tiny preset's cage_silence_ratio


@pytest.fixture(scope="module")
def text_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-text")
    return write_text(root / "A.txt", 0, 800), write_text(root / "B.txt", 1, 200)


def _argv(out: Path, text_pair, *extra: str) -> list[str]:
    train, validation = text_pair
    return ["--smoke", "--output_dir", str(out), "--train_file", str(train), "--validation_file", str(validation),
            *extra]  # fmt: skip


def _served_loss_here(export_dir: Path, fmt: str, validation: Path) -> float:
    """The export's validation loss computed here, independently of the demo's code: hf_cage.load_quantized for the
    hf-cage format, plain transformers for compressed-tensors; token-weighted mean over the smoke run's 8 blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_cage import load_quantized
    from hf_cage.data import load_token_blocks

    ids = load_token_blocks([validation], AutoTokenizer.from_pretrained(export_dir), 32)["input_ids"][:8]
    if fmt == "hf-cage":
        model = load_quantized(export_dir, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


# QuEST (the tiny preset's quantizer: hf-cage export) through the parallel processes `make demo` starts; the int
# quantizer (compressed-tensors export, served by stock transformers in a process without hf_cage) in-process.
@pytest.mark.parametrize("quantizer, in_process", [("quest", False), ("int", True)])
def test_demo_smoke_branches_exports_and_prints_what_it_measured(tmp_path, text_pair, capsys, quantizer, in_process):
    out = tmp_path / "demo"
    assert demo.main(_argv(out, text_pair, "--quantizer", quantizer, *(["--in_process"] if in_process else []))) == 0
    printed = capsys.readouterr().out
    runs = {m: json.loads((out / m / "metrics.json").read_text()) for m in ("bf16", "ste", "cage")}

    # BF16 and STE trained from the start; CAGE resumed the STE checkpoint at the end of silence
    branch = recipe_common.silence_end_step(STEPS, SILENCE)
    checkpoint = out / "ste" / f"checkpoint-{branch}"
    assert branch == 8 and (checkpoint / "trainer_state.json").is_file()
    assert [runs[m]["steps"] for m in runs] == [STEPS] * 3
    assert [runs[m]["resumed_from"] for m in runs] == [None, None, str(checkpoint)]
    assert (runs["ste"]["quantizer"], runs["cage"]["quantizer"], runs["bf16"]["w_bits"]) == (
        quantizer,
        quantizer,
        None,
    )
    assert (runs["ste"]["cage_lambda"], runs["cage"]["cage_lambda"]) == (0.0, 56.0)
    history = json.loads((out / "cage" / "log_history.json").read_text())
    lambdas = {e["step"]: e["cage/lambda"] for e in history if "cage/lambda" in e}
    assert sorted(lambdas) == list(range(1, STEPS + 1))
    assert all(lambdas[s] == 0 for s in range(1, branch + 1)) and all(lambdas[s] > 0 for s in (branch + 1, STEPS))

    # the table and the summary lines are the numbers the runs wrote
    for method in ("bf16", "ste", "cage"):
        assert f"| {runs[method]['eval_loss']:.4f} | {runs[method]['eval_perplexity']:.2f} |" in printed
    assert f"| {STEPS - branch} (after {branch} shared) |" in printed
    diff = runs["cage"]["eval_loss"] - runs["ste"]["eval_loss"]
    assert f"Paired difference, CAGE - STE: {diff:+.4f} nats" in printed
    gap = runs["ste"]["eval_loss"] - runs["bf16"]["eval_loss"]
    if gap > 0:
        assert f"STE-to-BF16 gap: {gap:.4f} nats; CAGE closed {-diff / gap:+.1%} of it." in printed
    else:
        assert "no gap to close" in printed

    # the export, evaluated as served: the printed loss is what loading the files gives, and equals the trained loss
    export = out / "export"
    assert (export / "config.json").is_file() and (export / "README.md").is_file()
    fmt = "compressed-tensors" if quantizer == "int" else "hf-cage"
    match = re.search(r"Served loss of the export: (\d+\.\d{4}) \(trained CAGE model: (\d+\.\d{4})", printed)
    assert match and f"{fmt} format, loaded with" in printed
    served = float(match.group(1))
    assert served == pytest.approx(_served_loss_here(export, fmt, text_pair[1]), abs=6e-5)
    assert served == pytest.approx(runs["cage"]["eval_loss"], abs=1e-3)
    assert "Wall time:" in printed


def test_demo_reuses_matching_baselines_and_retrains_changed_ones(tmp_path, text_pair, capsys):
    out = tmp_path / "demo"
    assert demo.main(_argv(out, text_pair, "--in_process")) == 0
    first = {m: json.loads((out / m / "metrics.json").read_text()) for m in ("bf16", "ste", "cage")}
    capsys.readouterr()
    assert demo.main(_argv(out, text_pair, "--in_process")) == 0
    printed = capsys.readouterr().out
    assert "reusing the cached bf16 run" in printed and "reusing the cached ste run" in printed
    assert json.loads((out / "ste" / "metrics.json").read_text()) == first["ste"]
    again = json.loads((out / "cage" / "metrics.json").read_text())
    assert again["eval_loss"] == first["cage"]["eval_loss"]  # the CAGE branch is retrained, deterministically
    record = out / "bf16" / demo.RUN_RECORD  # a run cached before the training changed (no revision): retrained
    record.write_text(json.dumps({"argv": json.loads(record.read_text())["argv"]}))
    capsys.readouterr()
    assert demo.main(_argv(out, text_pair, "--in_process")) == 0
    printed = capsys.readouterr().out
    assert "reusing the cached bf16 run" not in printed and "reusing the cached ste run" in printed
    assert json.loads(record.read_text())["training_revision"] == demo.TRAINING_REVISION
    assert demo.main(_argv(out, text_pair, "--in_process", "--seed", "1")) == 0
    assert "reusing" not in capsys.readouterr().out


def test_demo_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, text_pair, capsys):
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)))
    out = tmp_path / "demo"
    argv = ["--smoke", "--output_dir", str(out), "--train_file", str(binary), "--validation_file", str(text_pair[1])]
    assert demo.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"demo.py: error: --train_file {binary}: a binary file")
    assert not out.exists()

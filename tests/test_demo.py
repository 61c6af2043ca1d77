"""recipes/demo.py (the main job), through its seconds-long ``--smoke`` path: the same processes, base, branch,
export and report as ``make demo``, on a toy model and two small text files; what it prints is checked against what
it wrote and against an independent evaluation of the export."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from test_recipes import RECIPES, write_text

from hf_cage.optim.defaults import CAGE_PULL_DEFAULTS
from hf_cage.trainer.comparison import silence_end_step

sys.path.insert(0, str(RECIPES))
demo = importlib.import_module("demo")
demo_runs = importlib.import_module("demo_runs")

STEPS = 10  # demo.SMOKE_DATA
METHODS = ("bf16", "ste", "cage")


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
    hf-cage format, plain transformers for compressed-tensors; one batch of the smoke run's 8 blocks."""
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


def _check_report(printed: str, runs: dict, branch: int, increase: str) -> None:
    """The table and the summary lines are the numbers the runs wrote."""
    for method in METHODS:
        assert f"| {runs[method]['eval_loss']:.4f} | {runs[method]['eval_perplexity']:.2f} |" in printed
    assert f"| {STEPS - branch} (after {branch} shared) |" in printed
    diff = runs["cage"]["eval_loss"] - runs["ste"]["eval_loss"]
    assert f"Paired difference, CAGE - STE: {diff:+.4f} nats" in printed
    gap = runs["ste"]["eval_loss"] - runs["bf16"]["eval_loss"]
    if gap > 0:
        assert re.search(rf"{increase}: {gap:.4f} nats; CAGE (removed|closed) {-diff / gap:+.1%} of it\.", printed)
    else:
        assert "nothing to remove" in printed


def _check_served(printed: str, export: Path, fmt: str, cage: dict, validation: Path) -> None:
    """The export, evaluated as served: the printed loss is what loading the files gives, and the trained loss."""
    assert (export / "config.json").is_file() and (export / "README.md").is_file()
    match = re.search(r"Served loss of the export: (\d+\.\d{4}) \(trained CAGE model: (\d+\.\d{4})", printed)
    assert match and f"{fmt} format, loaded by" in printed
    served = float(match.group(1))
    assert served == pytest.approx(_served_loss_here(export, fmt, validation), abs=6e-5)
    # compressed-tensors: the trained loss (exact logits, summed in another order); hf-cage (QuEST): within the
    # tie flips a rotation may take
    assert served == pytest.approx(cage["eval_loss"], abs=6e-5 if fmt == "compressed-tensors" else 1e-3)
    assert re.search(r"Time: +\d+ s wall, \d+ s CPU", printed)


def test_finetune_job_trains_a_base_then_branches_exports_int4_and_serves_it_stock(tmp_path, text_pair, capsys):
    """The default job (what `make demo` runs), through its parallel processes."""
    out = tmp_path / "demo"
    assert demo.main(_argv(out, text_pair)) == 0
    printed = capsys.readouterr().out
    base = json.loads((out / "finetune" / "base" / "metrics.json").read_text())
    runs = {m: json.loads((out / "finetune" / m / "metrics.json").read_text()) for m in METHODS}

    # a BF16 base pretrained here; every fine-tuning run starts from it
    assert (base["method"], base["steps"], base["w_bits"]) == ("bf16", STEPS, None)
    assert all(runs[m]["base_model"] == str(out / "finetune" / "base") for m in METHODS)
    # BF16 and STE fine-tuned from the start; CAGE resumed the STE checkpoint at the end of silence (half the run)
    branch = silence_end_step(STEPS, 0.5)
    checkpoint = out / "finetune" / "ste" / f"checkpoint-{branch}"
    assert branch == 5 and (checkpoint / "trainer_state.json").is_file()
    assert [runs[m]["steps"] for m in METHODS] == [STEPS] * 3
    assert [runs[m]["resumed_from"] for m in METHODS] == [None, None, str(checkpoint)]
    # weight-only int4, per group of 32 (the toy model's widths are 32 and 64), the fine-tuning strength
    assert [(runs[m]["w_bits"], runs[m]["a_bits"], runs[m]["quantizer"]) for m in METHODS] == [
        (None, None, None),
        (4, None, "int"),
        (4, None, "int"),
    ]
    assert runs["ste"]["cage_lambda"] == 0 and runs["cage"]["learning_rate"] == 5e-4
    assert runs["cage"]["cage_pull"] == CAGE_PULL_DEFAULTS["fine-tuning"] and runs["cage"]["cage_silence_ratio"] == 0.5
    assert runs["cage"]["cage_pull_realised"] == pytest.approx(CAGE_PULL_DEFAULTS["fine-tuning"], rel=1e-6)
    history = json.loads((out / "finetune" / "cage" / "log_history.json").read_text())
    lambdas = {e["step"]: e["cage/lambda"] for e in history if "cage/lambda" in e}
    assert sorted(lambdas) == list(range(1, STEPS + 1))
    assert all(lambdas[s] == 0 for s in range(1, branch + 1)) and all(lambdas[s] > 0 for s in (branch + 1, STEPS))

    _check_report(printed, runs, branch, "STE's loss increase over BF16 fine-tuned")
    assert f"| {base['eval_loss']:.4f} |" in printed and "W4A16 int, group 32" in printed
    export = out / "finetune" / "export"
    quantization = json.loads((export / "config.json").read_text())["quantization_config"]
    (group,) = quantization["config_groups"].values()
    assert group["weights"]["group_size"] == 32 and group["weights"]["num_bits"] == 4
    assert group.get("input_activations") is None  # weight-only: served as W4A16
    _check_served(printed, export, "compressed-tensors", runs["cage"], text_pair[1])
    assert "stock transformers (no hf_cage) in float32" in printed


def test_pretrain_job_is_one_flag_away(tmp_path, text_pair, capsys):
    """``--job pretrain``: BF16, STE and CAGE W4A4 QuEST from scratch (in this process), the hf-cage export."""
    out = tmp_path / "demo"
    assert demo.main(_argv(out, text_pair, "--job", "pretrain", "--in_process")) == 0
    printed = capsys.readouterr().out
    dirs = {"bf16": out / "pretrain" / "bf16", "ste": out / "pretrain" / "ste", "cage": out / "pretrain" / "cage"}
    runs = {m: json.loads((d / "metrics.json").read_text()) for m, d in dirs.items()}
    branch = silence_end_step(STEPS, 0.8)  # the tiny preset's silence
    assert [runs[m]["resumed_from"] for m in METHODS] == [None, None, str(dirs["ste"] / f"checkpoint-{branch}")]
    assert [runs[m]["a_bits"] for m in METHODS] == [None, 4, 4] and runs["cage"]["quantizer"] == "quest"
    # The tiny preset asks for the pretraining pull; the trainer derives lambda from this short run's schedule.
    assert runs["ste"]["cage_lambda"] == 0.0 and runs["cage"]["cage_pull"] == CAGE_PULL_DEFAULTS["pretraining"]
    assert runs["cage"]["cage_pull_realised"] == pytest.approx(CAGE_PULL_DEFAULTS["pretraining"], rel=1e-6)
    _check_report(printed, runs, branch, "STE-to-BF16 gap")
    _check_served(printed, out / "pretrain" / "export", "hf-cage", runs["cage"], text_pair[1])
    assert "hf_cage.load_quantized in float32" in printed


def test_demo_reuses_matching_runs_and_retrains_what_depends_on_a_changed_one(tmp_path, text_pair, capsys):
    out = tmp_path / "demo"
    assert demo.main(_argv(out, text_pair, "--in_process")) == 0
    first = {m: json.loads((out / "finetune" / m / "metrics.json").read_text()) for m in METHODS}
    capsys.readouterr()
    assert demo.main(_argv(out, text_pair, "--in_process")) == 0
    printed = capsys.readouterr().out
    assert "reusing the cached BF16 base" in printed
    assert "reusing the cached finetune bf16 run" in printed and "reusing the cached finetune ste run" in printed
    assert json.loads((out / "finetune" / "ste" / "metrics.json").read_text()) == first["ste"]
    again = json.loads((out / "finetune" / "cage" / "metrics.json").read_text())
    assert again["eval_loss"] == first["cage"]["eval_loss"]  # the CAGE branch is retrained, deterministically
    # a base cached before the training changed (no revision) is retrained, and the fine-tuning runs with it
    record = out / "finetune" / "base" / demo_runs.RUN_RECORD
    record.write_text(json.dumps({"argv": json.loads(record.read_text())["argv"]}))
    capsys.readouterr()
    assert demo.main(_argv(out, text_pair, "--in_process")) == 0
    assert "reusing" not in capsys.readouterr().out
    assert json.loads(record.read_text())["training_revision"] == demo_runs.TRAINING_REVISION


def test_demo_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, text_pair, capsys):
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)))
    out = tmp_path / "demo"
    argv = ["--smoke", "--output_dir", str(out), "--train_file", str(binary), "--validation_file", str(text_pair[1])]
    assert demo.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"demo.py: error: --train_file {binary}: a binary file")
    assert not out.exists()


def test_group_size_is_the_largest_the_widths_allow():
    assert demo.largest_group(64, 192) == 64 and demo.largest_group(32, 64) == 32
    with pytest.raises(ValueError, match="no group size"):
        demo.largest_group(48, 96)

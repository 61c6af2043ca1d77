"""The recipes' help tells the truth: their own flags first, Trainer's behind --help-all, the branching example's
checkpoint is the one a run saves, and a run with --save_branch_checkpoint prints the path to branch from."""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from pathlib import Path

import pytest
import yaml

from hf_cage.trainer.comparison import silence_end_step

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))
pretrain_llama = importlib.import_module("pretrain_llama")
finetune_llama = importlib.import_module("finetune_llama")


def help_text(module, flag: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        module.main([flag])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def positions(text: str, flags: list[str]) -> list[int]:
    found = [re.search(rf"^  {re.escape(f)}\b", text, re.MULTILINE) for f in flags]
    assert all(found), [f for f, m in zip(flags, found) if m is None]
    return [m.start() for m in found]


@pytest.mark.parametrize(
    "module, own",
    [
        (pretrain_llama, ["--config", "--method", "--save_branch_checkpoint", "--hidden_size", "--train_file"]),
        (finetune_llama, ["--model_name_or_path", "--lora", "--merge", "--config", "--method"]),
    ],
)
def test_help_shows_the_recipes_own_flags_before_trainers(module, own, capsys):
    short = help_text(module, "--help", capsys)
    cage = ["--quant_w_bits", "--cage_lambda", "--cage_silence_ratio"]
    common = ["--output_dir", "--max_steps", "--learning_rate"]
    own_at, cage_at, common_at = positions(short, own), positions(short, cage), positions(short, common)
    assert max(own_at) < min(cage_at) and max(cage_at) < min(common_at)
    # A TrainingArguments flag outside the common set is only behind --help-all, which lists every flag once.
    rare = "--dataloader_pin_memory"
    assert rare not in short and "--help-all" in short
    full = help_text(module, "--help-all", capsys)
    positions(full, [rare, *own, *cage, *common])
    from transformers import TrainingArguments

    every = {f"--{f.name}" for f in dataclasses.fields(TrainingArguments) if f.init}
    assert every <= set(re.findall(r"^  (--\w+)", full, re.MULTILINE))
    assert len(short.splitlines()) < len(full.splitlines()) / 2


@pytest.mark.parametrize("module", [pretrain_llama, finetune_llama])
def test_the_branching_examples_name_the_checkpoint_the_run_saves(module):
    """Each ``checkpoint-N`` in a recipe's help is the silence end of the ``--max_steps`` of the commands before
    it (the tiny preset's 1500 when they give none) at the tiny preset's silence ratio."""
    tiny = yaml.safe_load((RECIPES / "configs" / "tiny.yaml").read_text())
    doc = module.__doc__
    named = list(re.finditer(r"checkpoint-(\d+)", doc))
    assert named
    for match in named:
        steps = re.findall(r"--max_steps (\d+)", doc[doc.rfind("\n\n", 0, match.start()) : match.start()])
        total = int(steps[-1]) if steps else tiny["max_steps"]
        assert int(match.group(1)) == silence_end_step(total, tiny["cage_silence_ratio"]), match.group()


def test_a_run_with_save_branch_checkpoint_prints_the_path_to_branch_from(tmp_path, capsys):
    text = "\n\n".join(f"line {i} of the play, the king speaks and the queen answers" for i in range(300))
    for name in ("A.txt", "B.txt"):
        (tmp_path / name).write_text(text, encoding="utf-8")
    out = tmp_path / "ste"
    argv = [
        "--config", "tiny", "--method", "ste", "--max_steps", "4", "--cage_silence_ratio", "0.5",
        "--save_branch_checkpoint", "--output_dir", str(out), "--train_file", str(tmp_path / "A.txt"),
        "--validation_file", str(tmp_path / "B.txt"), "--cache_dir", str(tmp_path / "cache"), "--vocab_size", "300",
        "--block_size", "32", "--per_device_train_batch_size", "2", "--max_eval_samples", "4", "--hidden_size", "32",
        "--intermediate_size", "64", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--no_plot",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    capsys.readouterr()
    assert pretrain_llama.main(argv) == 0
    printed = capsys.readouterr().out
    branch = out / "checkpoint-2"
    assert (branch / "trainer_state.json").is_file()
    assert f"branch checkpoint: {branch} " in printed
    assert f"--resume_from_checkpoint {branch}" in printed.splitlines()[-1]

"""The recipes end to end on two small text files: pretraining (bf16 / ste / cage), fine-tuning, presets, bad input."""

from __future__ import annotations

import importlib
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))
pretrain_llama = importlib.import_module("pretrain_llama")
finetune_llama = importlib.import_module("finetune_llama")
recipe_common = importlib.import_module("recipe_common")

WORDS = (
    "the king queen lord lady crown sword night day love death time world heart hand eye blood fair sweet "
    "good noble speak come go make know think hear see stand fly fall rise weep laugh and or but not with "
    "my thy his her our your their this that what why how when where now then here there thou thee"
).split()
PAPER_PRESETS = {"30m": 30e6, "50m": 50e6, "100m": 100e6, "200m": 200e6, "430m": 430e6, "800m": 800e6}
# A model small enough that five steps take a second or two on a busy CPU.
SMALL_RUN = [
    "--vocab_size", "300", "--block_size", "32", "--per_device_train_batch_size", "4", "--max_eval_samples", "8",
    "--per_device_eval_batch_size", "8", "--eval_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
]  # fmt: skip
SMALL = ["--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "1",
         "--num_attention_heads", "2", *SMALL_RUN]  # fmt: skip


def write_text(path: Path, seed: int, lines: int) -> Path:
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(lines // 4):
        body = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) for _ in range(4))
        paragraphs.append(body.capitalize() + ".")
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def text_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return write_text(root / "A.txt", 0, 800), write_text(root / "B.txt", 1, 200)


def pretrain_argv(text_pair, out: Path, method: str, steps: int = 5) -> list[str]:
    train, validation = text_pair
    return [
        "--config", str(RECIPES / "configs" / "tiny.yaml"), "--method", method, "--max_steps", str(steps),
        "--output_dir", str(out), "--train_file", str(train), "--validation_file", str(validation),
        "--cache_dir", str(out.parent / "cache"), *SMALL,
    ]  # fmt: skip


def read_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory, text_pair):
    out = tmp_path_factory.mktemp("runs") / "bf16"
    assert pretrain_llama.main(pretrain_argv(text_pair, out, "bf16", steps=6)) == 0
    return out


def test_pretrain_cage_writes_metrics_plot_and_a_reloadable_model(tmp_path, text_pair):
    import hf_cage

    out = tmp_path / "cage"
    assert pretrain_llama.main(pretrain_argv(text_pair, out, "cage") + ["--w_bits", "3", "--a_bits", "3"]) == 0
    metrics = read_metrics(out)
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert (metrics["method"], metrics["w_bits"], metrics["a_bits"], metrics["quantizer"]) == ("cage", 3, 3, "quest")
    assert (metrics["steps"], metrics["tokens"], metrics["preset"]) == (5, 5 * 4 * 32, "tiny")
    assert metrics["cage_lambda"] == 10.0 and metrics["cage_silence_ratio"] == 0.8  # from the tiny preset
    assert metrics["wall_time_s"] > 0
    history = json.loads((out / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4, 5]
    assert (out / "loss_curve.png").stat().st_size > 1000
    model = hf_cage.load_qat_model(out, dtype=torch.float32)
    assert hf_cage.quant_config_of(model).w_bits == 3
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("method", ["bf16", "ste"])
def test_pretrain_baselines(bf16_checkpoint, tmp_path, text_pair, method):
    out = bf16_checkpoint if method == "bf16" else tmp_path / method
    if method != "bf16":
        assert pretrain_llama.main(pretrain_argv(text_pair, out, method)) == 0
    metrics = read_metrics(out)
    assert metrics["method"] == method and math.isfinite(metrics["eval_loss"])
    if method == "bf16":
        assert metrics["w_bits"] is None and metrics["cage_lambda"] is None
        assert "hf_cage_quantization" not in json.loads((out / "config.json").read_text())
    else:
        assert metrics["w_bits"] == 4 and metrics["cage_lambda"] == 0.0


def test_finetune_full_cage_from_bf16_checkpoint(bf16_checkpoint, tmp_path, text_pair):
    train, validation = text_pair
    out = tmp_path / "ft"
    argv = ["--config", "tiny", "--model_name_or_path", str(bf16_checkpoint), "--method", "cage",
            "--max_steps", "4", "--output_dir", str(out), "--train_file", str(train),
            "--validation_file", str(validation), *SMALL_RUN]  # fmt: skip
    assert finetune_llama.main(argv) == 0
    metrics = read_metrics(out)
    assert metrics["method"] == "cage" and metrics["lora"] is False and metrics["steps"] == 4
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics["eval_loss_start"])
    assert metrics["trainable_parameters"] == sum(p.numel() for p in _load(bf16_checkpoint).parameters())


def test_finetune_lora_saves_adapters_and_reports_merge(bf16_checkpoint, tmp_path, text_pair):
    from peft import PeftModel

    import hf_cage

    train, validation = text_pair
    out = tmp_path / "lora"
    argv = ["--config", "tiny", "--model_name_or_path", str(bf16_checkpoint), "--method", "ste", "--lora",
            "--lora_r", "4", "--merge", "--max_steps", "4", "--learning_rate", "1e-2", "--output_dir", str(out),
            "--train_file", str(train), "--validation_file", str(validation), *SMALL_RUN]  # fmt: skip
    assert finetune_llama.main(argv) == 0
    metrics = read_metrics(out)
    assert metrics["lora"] is True and metrics["lora_r"] == 4
    assert metrics["eval_loss_unmerged"] == metrics["eval_loss"]
    assert metrics["merge_loss_change"] == pytest.approx(metrics["eval_loss_merged"] - metrics["eval_loss"])
    assert (out / "adapter_model.safetensors").is_file() and (out / "merged" / "config.json").is_file()

    config = hf_cage.QuantConfig.from_dict(json.loads((out / "hf_cage_quant_config.json").read_text()))
    model = PeftModel.from_pretrained(hf_cage.quantize_model(_load(bf16_checkpoint), config), out)
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == metrics["trainable_parameters"] > 0
    merged = hf_cage.load_qat_model(out / "merged", dtype=torch.float32)
    assert hf_cage.quant_config_of(merged) == config


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _error(capsys, main, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_say_what_to_do(tmp_path, text_pair, capsys):
    train, validation = text_pair
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    base = ["--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--cache_dir", str(tmp_path / "cache")]
    main = pretrain_llama.main
    assert "no such file" in _error(capsys, main, base + ["--train_file", "nope.txt", "--validation_file", str(train)])
    assert "is empty" in _error(capsys, main, base + ["--train_file", str(empty), "--validation_file", str(train)])
    err = _error(capsys, main, base + ["--config", "huge"])
    assert "unknown preset" in err and "tiny" in err and "30m" in err
    assert "together" in _error(capsys, main, base + ["--train_file", str(train)])
    assert "bf16, ste, cage" in _error(capsys, main, base + ["--method", "fp8"])
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.\n")
    err = _error(capsys, main, base + ["--train_file", str(short), "--validation_file", str(short), *SMALL])
    assert "fewer than block_size" in err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("hidden_size: 64\nhiden_layers: 2\n")
    assert "unknown keys ['hiden_layers']" in _error(capsys, main, base + ["--config", str(bad_yaml)])
    ft = finetune_llama.main
    assert "no config.json" in _error(capsys, ft, base + ["--model_name_or_path", str(tmp_path)])
    assert "--model_name_or_path" in _error(capsys, ft, base)
    assert "--merge needs --lora" in _error(capsys, ft, base + ["--model_name_or_path", str(tmp_path), "--merge"])
    lora_cage = base + ["--model_name_or_path", str(tmp_path), "--lora", "--method", "cage"]
    assert "use --method ste --lora" in _error(capsys, ft, lora_cage)


def test_flags_override_the_yaml_preset():
    model_args, data_args, recipe_args, training_args = recipe_common.parse_arguments(
        pretrain_llama.argument_types(),
        ["--config", "tiny", "--max_steps", "7", "--w_bits", "3", "--block_size", "64"],
    )
    assert (model_args.hidden_size, model_args.num_hidden_layers) == (128, 4)  # from tiny.yaml
    assert (training_args.max_steps, training_args.quant_w_bits, data_args.block_size) == (7, 3, 64)
    assert training_args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert recipe_args.config == "tiny"
    for flag, value in (("--a_bits", "none"), ("--a_bits", "0"), ("--quant_a_bits", "None")):
        args = recipe_common.parse_arguments(pretrain_llama.argument_types(), ["--config", "tiny", flag, value])
        assert args[3].quant_config().a_bits is None  # weight-only


@pytest.mark.parametrize("name", ["tiny", *PAPER_PRESETS])
def test_presets_parse_and_paper_shapes_match_their_names(name):
    from transformers import LlamaForCausalLM

    model_args, data_args, _, training_args = recipe_common.parse_arguments(
        pretrain_llama.argument_types(), ["--config", name, "--bf16", "false", "--use_cpu", "true"]
    )
    tokenizer = type("Vocab", (), {"__len__": lambda self: data_args.vocab_size, "bos_token_id": 0,
                                   "eos_token_id": 1, "pad_token_id": 2})()  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(model_args.llama_config(tokenizer, data_args.block_size))
    blocks = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    total = sum(p.numel() for p in model.parameters())
    if name == "tiny":
        assert 1e6 <= total <= 3e6
    else:
        assert blocks == pytest.approx(PAPER_PRESETS[name], rel=0.05)
        assert model_args.hidden_size == 128 * model_args.num_attention_heads
        assert data_args.block_size == 512 and training_args.warmup_steps == 0.1
        tokens_per_step = training_args.per_device_train_batch_size * 8 * data_args.block_size
        assert training_args.max_steps * tokens_per_step == pytest.approx(100 * blocks, rel=0.01)

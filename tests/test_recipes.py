"""The recipes end to end on two small text files: pretraining (bf16 / ste / cage), branching, fine-tuning, presets
(shapes and the CAGE pull), bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import importlib
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from hf_cage.optim.defaults import CAGE_PULL_DEFAULTS
from hf_cage.trainer.comparison import silence_end_step

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))
pretrain_llama = importlib.import_module("pretrain_llama")
finetune_llama = importlib.import_module("finetune_llama")
recipe_common = importlib.import_module("recipe_common")
recipe_training = importlib.import_module("recipe_training")
MODEL_SHAPE_KEYS = recipe_common.MODEL_SHAPE_KEYS

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
    assert metrics["cage_silence_ratio"] == 0.8  # from the tiny preset
    assert metrics["cage_pull"] == CAGE_PULL_DEFAULTS["pretraining"]  # the job's default strength
    assert (
        metrics["cage_pull_realised"] == pytest.approx(metrics["cage_pull"], rel=1e-9) and metrics["cage_lambda"] > 0
    )
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


def test_finetune_lora_saves_adapters_and_reports_merge(bf16_checkpoint, tmp_path, text_pair, capsys):
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
    assert (out / "adapter_model.safetensors").is_file() and (out / "merged" / "config.json").is_file()

    config = hf_cage.QuantConfig.from_dict(json.loads((out / "hf_cage_quant_config.json").read_text()))
    model = PeftModel.from_pretrained(hf_cage.quantize_model(_load(bf16_checkpoint), config), out)
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == metrics["trainable_parameters"] > 0
    merged = hf_cage.load_qat_model(out / "merged", dtype=torch.float32)
    assert hf_cage.quant_config_of(merged) == config

    # Both reported losses, recomputed here from what was saved: the adapters on their quantized base, and the
    # merged, re-quantized model (SMALL_RUN keeps 8 validation blocks, one evaluation batch).
    ids = _validation_ids(out, validation)
    unmerged, merged_loss = _loss(model, ids), _loss(merged, ids)
    assert metrics["eval_loss_unmerged"] == pytest.approx(unmerged, rel=1e-6)
    assert metrics["eval_loss_merged"] == pytest.approx(merged_loss, rel=1e-6)
    assert abs(merged_loss - unmerged) > 1e-4  # merging changes the model: the two losses can be told apart
    assert metrics["merge_loss_change"] == pytest.approx(merged_loss - unmerged, rel=1e-4)
    # The printed line shows the merged model's loss, not the adapters' (they differ at the printed precision).
    line = [ln for ln in capsys.readouterr().out.splitlines() if "merged and re-quantized" in ln][-1]
    assert f"{merged_loss:.4f}" != f"{unmerged:.4f}"
    assert f"merged and re-quantized {merged_loss:.4f} after 4 steps" in line


def _validation_ids(tokenizer_dir: Path, validation: Path, block_size: int = 32, blocks: int = 8) -> torch.Tensor:
    from transformers import AutoTokenizer

    from hf_cage.data import load_token_blocks

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return load_token_blocks([validation], tokenizer, block_size)["input_ids"][:blocks]


def _loss(model, ids: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _error(capsys, main, argv, one_line: bool = True) -> str:
    """Run a recipe's ``main`` on bad input: exit code 2 and its one-line message (the only stderr line, unless
    the input was found bad only after data preparation had started and printed its progress)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith(
        ("pretrain_llama.py: error: ", "finetune_llama.py: error: ")
    )
    assert len(lines) == 1 or not one_line, err
    return lines[-1]


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
    err = _error(capsys, main, base + ["--train_file", str(short), "--validation_file", str(short), *SMALL], False)
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
    assert not (tmp_path / "out").exists()


def _bad_files(root: Path) -> dict[str, Path]:
    binary = root / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    latin1 = root / "latin1.txt"
    latin1.write_bytes(("Caf\u00e9 au lait. " * 50 + "\n").encode("latin-1"))
    cut = root / "cut.txt"
    cut.write_bytes("Une phrase enti\u00e8re. ".encode() * 20 + "\u00e9".encode()[:1])
    return {"binary": binary, "latin1": latin1, "cut": cut}


# Every bad input the issue lists: one line on stderr that says what was wrong, exit 2, and nothing written (no
# output folder, no cache: the run stops before it builds anything).
BAD_INPUTS = {
    "w_bits 5": (["--w_bits", "5"], ["quant_w_bits=5", "2, 3, 4, 8"]),
    "a_bits 6": (["--a_bits", "6"], ["quant_a_bits=6"]),
    "group 48": (["--quant_granularity", "group", "--quant_group_size", "48"], ["quant_group_size=48", "32, 64, 128"]),
    "cage lambda -1": (["--cage_lambda", "-1"], ["cage_lambda=-1", ">= 0"]),
    "max_steps 0 cage": (["--method", "cage", "--max_steps", "0"], ["--max_steps 0 trains nothing"]),
    "max_steps 0 ste": (["--method", "ste", "--max_steps", "0"], ["--max_steps 0 trains nothing"]),
    "max_steps -3": (["--max_steps", "-3"], ["--max_steps -3 trains nothing"]),
    "no epochs": (["--max_steps", "-1", "--num_train_epochs", "0"], ["--num_train_epochs 0"]),
    "unknown flag": (["--hidden_layers", "2"], ["unrecognized arguments: --hidden_layers"]),
    "not a number": (["--learning_rate", "fast"], ["invalid float value: 'fast'"]),
    "binary train": (["--train_file", "{binary}", "--validation_file", "{good}"], ["--train_file {binary}", "binary"]),
    "latin-1 validation": (
        ["--train_file", "{good}", "--validation_file", "{latin1}"], ["--validation_file {latin1}", "not UTF-8"]
    ),
    "cut utf-8": (["--train_file", "{cut}", "--validation_file", "{good}"], ["--train_file {cut}", "not UTF-8"]),
    "no checkpoint": (["--resume_from_checkpoint", "{root}"], ["not a Trainer checkpoint"]),
    "batch size 0": (["--per_device_train_batch_size", "0"], ["--per_device_train_batch_size 0 must be at least 1"]),
    "learning rate -1": (["--learning_rate", "-1"], ["--learning_rate -1 is negative"]),
    "output below a file": (["--output_dir", "{good}/out"], ["--output_dir {good}/out lies below", "a file"]),
}  # fmt: skip


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, text_pair, bf16_checkpoint, capsys, case, script):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    names = {**{k: str(v) for k, v in _bad_files(inputs).items()}, "good": str(text_pair[0]), "root": str(inputs)}
    flags, expected = BAD_INPUTS[case]
    argv = ["--config", "tiny", "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
            "--max_steps", "2", *SMALL_RUN, *(f.format(**names) for f in flags)]  # fmt: skip
    if "--train_file" not in flags:
        argv += ["--train_file", str(text_pair[0]), "--validation_file", str(text_pair[1])]
    main = pretrain_llama.main
    if script == "finetune":
        main = finetune_llama.main
        argv += ["--model_name_or_path", str(bf16_checkpoint)]
    err = _error(capsys, main, argv)
    assert err.startswith(f"{script}_llama.py: error: ")
    for part in expected:
        assert part.format(**names) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_bad_input_from_the_command_line_exits_2_with_one_line(tmp_path):
    """The script itself (not just main()): the exit code and stderr a user sees."""
    import subprocess

    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(RECIPES / "pretrain_llama.py"), "--config", "tiny", "--w_bits", "5", "--output_dir", out],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "pretrain_llama.py: error: quant_w_bits=5 is not supported; allowed values: 2, 3, 4, 8"
    ]
    assert not out.exists()


def test_flags_override_the_yaml_preset():
    model_args, data_args, recipe_args, training_args = recipe_common.parse_arguments(
        pretrain_llama.argument_types(),
        ["--config", "tiny", "--max_steps", "7", "--w_bits", "3", "--block_size", "64"],
    )
    assert (model_args.hidden_size, model_args.num_hidden_layers) == (64, 2)  # from tiny.yaml
    assert (training_args.max_steps, training_args.quant_w_bits, data_args.block_size) == (7, 3, 64)
    assert training_args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert recipe_args.config == "tiny"
    for flag, value in (("--a_bits", "none"), ("--a_bits", "0"), ("--quant_a_bits", "None")):
        args = recipe_common.parse_arguments(pretrain_llama.argument_types(), ["--config", "tiny", flag, value])
        assert args[3].quant_config().a_bits is None  # weight-only
    args = recipe_common.parse_arguments(
        pretrain_llama.argument_types(), ["--config", "tiny", "--quantizer", "int", "--a_clip", "absmax"]
    )
    assert (args[3].quant_config().quantizer, args[3].quant_config().a_clip) == ("int", "absmax")


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
    tokens = training_args.max_steps * training_args.per_device_train_batch_size * data_args.block_size
    if name == "tiny":
        assert 2e5 <= total <= 1e6
        assert tokens / blocks >= 50  # the regime where CAGE's effect was measured (docs/results.md)
    else:
        assert blocks == pytest.approx(PAPER_PRESETS[name], rel=0.05)
        assert model_args.hidden_size == 128 * model_args.num_attention_heads
        assert data_args.block_size == 512 and training_args.warmup_steps == 0.1
        tokens_per_step = training_args.per_device_train_batch_size * 8 * data_args.block_size
        assert training_args.max_steps * tokens_per_step == pytest.approx(100 * blocks, rel=0.01)


def _strength(argv: list[str], script=pretrain_llama) -> tuple:
    """``(cage_pull, cage_lambda)`` as ``script`` parses ``argv``."""
    argv = argv + ["--bf16", "false", "--use_cpu", "true"]
    if script is finetune_llama:
        types = (finetune_llama.FinetuneArguments, *pretrain_llama.argument_types()[1:])
        argv, extra = argv + ["--model_name_or_path", "m"], dict(yaml_ignore=MODEL_SHAPE_KEYS, job="fine-tuning")
    else:
        types, extra = pretrain_llama.argument_types(), {}
    *_, args = recipe_common.parse_arguments(types, argv, **extra)
    return args.cage_pull, args.cage_lambda


@pytest.mark.parametrize("name", ["tiny", *PAPER_PRESETS])
def test_every_preset_asks_for_its_jobs_default_pull(name):
    """The strength is the job's total pull (tests/test_pull.py checks the trainer realises it), unless set."""
    assert _strength(["--config", name]) == (CAGE_PULL_DEFAULTS["pretraining"], None)
    assert _strength(["--config", name], finetune_llama) == (CAGE_PULL_DEFAULTS["fine-tuning"], None)
    assert _strength(["--config", name, "--cage_lambda", "7"]) == (None, 7.0)
    assert _strength(["--config", name, "--cage_pull=0.5"], finetune_llama) == (0.5, None)
    with pytest.raises(recipe_common.RecipeInputError, match="both set"):
        _strength(["--config", name, "--cage_pull", "1", "--cage_lambda", "7"])


def test_silence_end_step_is_the_last_step_the_schedule_keeps_silent():
    import hf_cage

    for total, ratio in ((1500, 0.8), (1500, 0.5), (7, 0.5), (10, 0.8), (3, 0.34), (5, 0.0), (100, 0.999)):
        step = silence_end_step(total, ratio)
        assert step == 0 or hf_cage.cage_lambda(step, total, 1.0, ratio, "linear_ramp") == 0
        assert step == total or hf_cage.cage_lambda(step + 1, total, 1.0, ratio, "linear_ramp") > 0
    assert silence_end_step(1500, 0.8) == 1200 and silence_end_step(7, 0.5) == 3


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_cage_branches_from_the_ste_checkpoint_at_the_end_of_silence(tmp_path, text_pair):
    """STE saves a checkpoint at the end of silence; a lambda-0 branch from it ends on the STE run's weights bit for
    bit (same data order, schedule, RNG), a CAGE branch differs only after the branch point."""
    silence = ["--cage_silence_ratio", "0.5"]
    ste = tmp_path / "ste"
    metrics = pretrain_llama.run(
        pretrain_argv(text_pair, ste, "ste", steps=6) + silence + ["--save_branch_checkpoint"]
    )
    assert metrics == read_metrics(ste) and metrics["resumed_from"] is None
    assert sorted(p.name for p in ste.glob("checkpoint-*")) == ["checkpoint-3"]
    checkpoint = str(ste / "checkpoint-3")

    zero = tmp_path / "zero"
    argv = pretrain_argv(text_pair, zero, "cage", steps=6) + silence + ["--resume_from_checkpoint", checkpoint]
    assert pretrain_llama.main(argv + ["--cage_lambda", "0"]) == 0
    expected, got = _weights(ste), _weights(zero)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name

    cage = tmp_path / "cage"
    argv = pretrain_argv(text_pair, cage, "cage", steps=6) + silence + ["--resume_from_checkpoint", checkpoint]
    metrics = pretrain_llama.run(argv + ["--cage_lambda", "10"])
    assert (metrics["steps"], metrics["resumed_from"], metrics["cage_lambda"]) == (6, checkpoint, 10.0)
    lambdas = [e["cage/lambda"] for e in json.loads((cage / "log_history.json").read_text()) if "cage/lambda" in e]
    assert lambdas[:3] == [0.0, 0.0, 0.0] and all(v > 0 for v in lambdas[3:]) and len(lambdas) == 6
    assert any(not torch.equal(expected[n], w) for n, w in _weights(cage).items())


def test_finetune_bf16_baseline_and_a_cage_branch_from_the_ste_finetune(bf16_checkpoint, tmp_path, text_pair):
    """The fine-tuning comparison the benchmark runs: BF16 fine-tuned the same way (no quantization), STE, and CAGE
    branched from the STE fine-tune at the end of silence; run() returns what metrics.json holds."""
    train, validation = text_pair
    common = ["--config", "tiny", "--model_name_or_path", str(bf16_checkpoint), "--max_steps", "4",
              "--learning_rate", "1e-3", "--cage_silence_ratio", "0.5", "--train_file", str(train),
              "--validation_file", str(validation), *SMALL_RUN]  # fmt: skip
    bf16 = finetune_llama.run(common + ["--method", "bf16", "--output_dir", str(tmp_path / "bf16")])
    assert bf16 == read_metrics(tmp_path / "bf16")
    assert (bf16["method"], bf16["w_bits"], bf16["steps"]) == ("bf16", None, 4)
    assert "hf_cage_quantization" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert bf16["eval_loss"] != bf16["eval_loss_start"]  # it trained

    ste_argv = common + ["--method", "ste", "--save_branch_checkpoint", "--output_dir", str(tmp_path / "ste")]
    ste = finetune_llama.run(ste_argv)
    assert (ste["w_bits"], ste["cage_lambda"]) == (4, 0.0)
    checkpoint = tmp_path / "ste" / "checkpoint-2"
    cage_argv = common + ["--method", "cage", "--cage_lambda", "10", "--output_dir", str(tmp_path / "cage")]
    cage = finetune_llama.run(cage_argv + ["--resume_from_checkpoint", str(checkpoint)])
    assert (cage["steps"], cage["resumed_from"], cage["eval_loss_start"]) == (
        4,
        str(checkpoint),
        ste["eval_loss_start"],
    )
    assert cage["eval_loss"] != ste["eval_loss"]


def test_bf16_baseline_decays_the_same_block_linears_as_the_qat_runs(tmp_path):
    from conftest import make_tiny_llama

    from hf_cage import CAGEConfig

    args = CAGEConfig(output_dir=str(tmp_path), weight_decay=0.1, use_cpu=True, report_to=[], max_steps=1)
    groups = {}
    for method in ("bf16", "ste"):
        model = make_tiny_llama()
        trainer = recipe_training.make_trainer(method, model, args, None, None)
        names = {id(p): n for n, p in model.named_parameters()}
        groups[method] = {
            g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in trainer.create_optimizer().param_groups
        }
    blocks = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = {n for n, _ in make_tiny_llama().named_parameters() if n.endswith(tuple(f"{b}.weight" for b in blocks))}
    assert groups["bf16"][0.1] == groups["ste"][0.1] == expected
    no_decay = groups["bf16"][0.0]
    assert "model.embed_tokens.weight" in no_decay and "model.norm.weight" in no_decay
    assert "lm_head.weight" in no_decay or make_tiny_llama().config.tie_word_embeddings
    assert no_decay == groups["ste"][0.0]


@pytest.mark.parametrize("world_size", [None, "1", "2"])
def test_exit_process_skips_interpreter_shutdown_only_for_a_rank_of_a_multi_process_launch(tmp_path, world_size):
    """A rank leaves with its exit code and flushed output but without interpreter shutdown (where a gloo group
    that DDP / FSDP2 keep alive can abort it); a single process exits normally."""
    import os
    import subprocess

    script = (
        "import atexit, sys\n"
        f"sys.path.insert(0, {str(RECIPES)!r})\n"
        "from recipe_training import exit_process\n"
        "atexit.register(lambda: print('interpreter shutdown ran', flush=True))\n"
        "print('trained', end='')\n"
        "exit_process(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    if world_size is not None:
        env["WORLD_SIZE"] = world_size
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 3
    shutdown = world_size != "2"
    assert run.stdout == "trained" + ("interpreter shutdown ran\n" if shutdown else "")


# ----------------------------------------------------------------------------- strict loading (issue 18)
def _finetune_argv(text_pair, tmp_path, checkpoint, *extra) -> list[str]:
    train, validation = text_pair
    return ["--config", "tiny", "--model_name_or_path", str(checkpoint), "--method", "ste", "--max_steps", "2",
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--train_file", str(train),
            "--validation_file", str(validation), *SMALL_RUN, *extra]  # fmt: skip


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    return to


def _drop_tensor(folder: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    del state[name]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_hidden_size_whose_head_width_rope_cannot_rotate_is_one_line_exit_2(tmp_path, text_pair, capsys):
    argv = pretrain_argv(text_pair, tmp_path / "out", "ste") + ["--hidden_size", "60", "--num_attention_heads", "4"]
    err = _error(capsys, pretrain_llama.main, argv)
    assert "model shape refused by transformers" in err and "head_dim" in err
    assert list(tmp_path.iterdir()) == []


def test_finetuning_refuses_an_export_and_broken_checkpoints_before_writing(
    bf16_checkpoint, tmp_path, text_pair, capsys
):
    """A packed export says what it is and how to load it; a truncated weights file or a broken config.json is one
    line; a deleted tensor is named. Exit 2 each time, and no output folder."""
    from hf_cage.export import export_checkpoint

    ste = tmp_path / "ste"
    assert finetune_llama.main(_finetune_argv(text_pair, tmp_path, bf16_checkpoint, "--output_dir", str(ste))) == 0
    export_checkpoint(ste, tmp_path / "exported", format="hf-cage", progress=False, log=None)
    truncated = _copy(bf16_checkpoint, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    broken = _copy(bf16_checkpoint, tmp_path / "broken")
    (broken / "config.json").write_text('{"model_type": "llama", ')
    deleted = _copy(bf16_checkpoint, tmp_path / "deleted")
    _drop_tensor(deleted, "model.layers.0.mlp.down_proj.weight")
    cases = {
        tmp_path / "exported": ["packed hf-cage export (format hf-cage)", "hf_cage.load_quantized"],
        truncated: ["not a readable safetensors file"],
        broken: ["config.json is malformed"],
        deleted: ["missing model.layers.0.mlp.down_proj.weight"],
    }
    for checkpoint, expected in cases.items():
        err = _error(capsys, finetune_llama.main, _finetune_argv(text_pair, tmp_path, checkpoint), one_line=False)
        assert err.startswith(f"finetune_llama.py: error: --model_name_or_path {checkpoint}: ")
        assert all(part in err for part in expected), err
        assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def ste_checkpoint(tmp_path_factory, text_pair):
    out = tmp_path_factory.mktemp("runs") / "ste"
    argv = pretrain_argv(text_pair, out, "ste", steps=4) + ["--cage_silence_ratio", "0.5", "--save_branch_checkpoint"]
    assert pretrain_llama.main(argv) == 0
    return out / "checkpoint-2"


def test_resuming_with_other_quantization_settings_is_refused(ste_checkpoint, tmp_path, text_pair, capsys):
    argv = pretrain_argv(text_pair, tmp_path / "out", "cage", steps=4) + [
        "--resume_from_checkpoint",
        str(ste_checkpoint),
    ]
    err = _error(capsys, pretrain_llama.main, argv + ["--w_bits", "3"])
    assert "other quantization settings: quant_w_bits=3 (checkpoint: 4)" in err
    err = _error(capsys, pretrain_llama.main, argv + ["--method", "bf16"])
    assert "was trained with quantization; --method bf16 cannot resume it" in err
    assert list(tmp_path.iterdir()) == []


def test_resuming_from_a_checkpoint_with_a_deleted_tensor_names_it(ste_checkpoint, tmp_path, text_pair, capsys):
    checkpoint = _copy(ste_checkpoint, tmp_path / "checkpoint-2")
    _drop_tensor(checkpoint, "model.layers.0.self_attn.q_proj.weight")
    argv = pretrain_argv(text_pair, tmp_path / "out", "cage", steps=4) + ["--resume_from_checkpoint", str(checkpoint)]
    err = _error(capsys, pretrain_llama.main, argv, one_line=False)
    assert "missing model.layers.0.self_attn.q_proj.weight" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "checkpoint-2"]  # no output folder


def test_resuming_lora_adapters_checks_the_adapter_tensors(bf16_checkpoint, tmp_path, text_pair, capsys):
    from safetensors.torch import load_file, save_file

    lora = ["--lora", "--lora_r", "4", "--max_steps", "4", "--cage_silence_ratio", "0.5"]
    first = _finetune_argv(text_pair, tmp_path, bf16_checkpoint, *lora, "--save_branch_checkpoint")
    assert finetune_llama.main(first + ["--output_dir", str(tmp_path / "lora")]) == 0
    checkpoint = tmp_path / "lora" / "checkpoint-2"
    resume = _finetune_argv(text_pair, tmp_path, bf16_checkpoint, *lora, "--resume_from_checkpoint", str(checkpoint))
    assert finetune_llama.main(resume + ["--output_dir", str(tmp_path / "resumed")]) == 0  # a whole checkpoint
    adapters = load_file(checkpoint / "adapter_model.safetensors")
    dropped = sorted(adapters)[0]
    del adapters[dropped]
    save_file(adapters, checkpoint / "adapter_model.safetensors")
    err = _error(capsys, finetune_llama.main, resume, one_line=False)
    assert f"missing {dropped}" in err and not (tmp_path / "out").exists()

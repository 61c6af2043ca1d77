"""CAGE through TRL (``hf_cage.trl``) and through any Trainer subclass (``CAGETrainerMixin`` / ``CAGEArguments``).

The SFT integration is compared with ``CAGETrainer`` bit for bit. TRL's ``SFTTrainer`` computes its loss with a
fused LM head whose gradients differ from the model's own loss in the last bits (about 4e-8 here, amplified by
Adam's first steps), so that comparison gives both trainers the one loss function (``compute_loss_func``); what
is compared is everything else: TRL's data pipeline and arguments, the optimizer, the correction, the schedules.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import make_tiny_llama

pytest.importorskip("trl")  # in requirements.txt: always there in the test venv
from datasets import Dataset  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

import hf_cage  # noqa: E402
from hf_cage import CAGEConfig, CAGECorrection, CAGETrainer, quant_config_of, quantized_layers  # noqa: E402
from hf_cage.trl import CAGEDPOConfig, CAGEDPOTrainer, CAGESFTConfig, CAGESFTTrainer  # noqa: E402

VOCAB = 300
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from hf_cage.data import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    text = folder / "text.txt"
    text.write_text("the king spoke to the queen and the lord answered the lady at night\n" * 40)
    return train_bpe_tokenizer([text], vocab_size=VOCAB, cache_dir=folder)


def common_args(path, **overrides) -> dict:
    """Settings every trainer here shares (TRL's bf16 / gradient checkpointing defaults off: CPU, exactness)."""
    values = dict(
        output_dir=str(path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, bf16=False, disable_tqdm=True,
        gradient_checkpointing=False, lr_scheduler_type="linear", weight_decay=0.0, cage_silence_ratio=0.25,
    )  # fmt: skip
    values.update(overrides)
    return values


def token_dataset() -> Dataset:
    ids = torch.randint(4, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist()})


def collate(rows):
    ids = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def model_loss(outputs, labels, num_items_in_batch=None):
    return ForCausalLMLoss(outputs.logits, labels, vocab_size=VOCAB, num_items_in_batch=num_items_in_batch)


def sft_only(args: dict) -> dict:
    return {**args, "packing": False, "completion_only_loss": False, "max_length": None}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_trl_configs_keep_their_defaults():
    for ours, theirs in ((CAGESFTConfig, SFTConfig), (CAGEDPOConfig, DPOConfig)):
        a, b = ours("out", use_cpu=True), theirs("out", use_cpu=True)
        for name in ("learning_rate", "bf16", "gradient_checkpointing", "logging_steps", "lr_scheduler_type"):
            assert getattr(a, name) == getattr(b, name), name
        assert (a.quant_w_bits, a.cage_lambda) == (4, 10.0)
    assert CAGESFTConfig("out", use_cpu=True).learning_rate == 2e-5
    with pytest.raises(ValueError, match="quant_w_bits=5"):
        CAGESFTConfig("out", use_cpu=True, quant_w_bits=5)
    with pytest.raises(ValueError, match="both set"):
        CAGEDPOConfig("out", use_cpu=True, cage_pull=0.2, cage_lambda=1.0)


def test_import_hf_cage_never_imports_trl():
    code = "import sys, hf_cage; hf_cage.CAGETrainer; hf_cage.CAGEArguments; assert 'trl' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sft_integration_equals_cage_trainer_bit_for_bit(tmp_path, tokenizer):
    args = common_args(tmp_path, cage_lambda=10.0)
    reference = make_tiny_llama(vocab_size=VOCAB)
    plain = CAGETrainer(
        reference,
        CAGEConfig(**args),
        train_dataset=token_dataset(),
        data_collator=collate,
        compute_loss_func=model_loss,
    )
    plain.train()
    model = make_tiny_llama(vocab_size=VOCAB)
    sft = CAGESFTTrainer(
        model, CAGESFTConfig(**sft_only(args)), train_dataset=token_dataset(), processing_class=tokenizer,
        compute_loss_func=model_loss,
    )  # fmt: skip
    sft.train()
    lambdas = [e["cage/lambda"] for e in sft.state.log_history if "loss" in e]
    assert lambdas == pytest.approx([0.0, 10 / 3, 20 / 3, 10.0])  # the correction ran in both
    assert same_weights(reference, model)
    assert not same_weights(model, _ste_sft_run(tmp_path / "ste", tokenizer, args))  # lambda > 0 made a difference


def _ste_sft_run(path, tokenizer, args) -> torch.nn.Module:
    model = make_tiny_llama(vocab_size=VOCAB)
    ste = {**sft_only(args), "output_dir": str(path), "cage_lambda": 0.0}
    CAGESFTTrainer(
        model, CAGESFTConfig(**ste), train_dataset=token_dataset(), processing_class=tokenizer,
        compute_loss_func=model_loss,
    ).train()  # fmt: skip
    return model


def test_sft_integration_with_lambda_0_equals_plain_sft_trainer(tmp_path, tokenizer):
    """TRL's own loss path and its default gradient checkpointing; the plain run gets the model quantized by hand."""
    args = sft_only(common_args(tmp_path, cage_lambda=0.0, gradient_checkpointing=True))
    ours = make_tiny_llama(vocab_size=VOCAB)
    CAGESFTTrainer(ours, CAGESFTConfig(**args), train_dataset=token_dataset(), processing_class=tokenizer).train()
    config = CAGESFTConfig(**args)
    theirs = hf_cage.quantize_model(make_tiny_llama(vocab_size=VOCAB), config.quant_config())
    plain_args = {k: v for k, v in args.items() if not k.startswith(("cage_", "quant_"))}
    SFTTrainer(theirs, SFTConfig(**plain_args), train_dataset=token_dataset(), processing_class=tokenizer).train()
    assert same_weights(ours, theirs)
    assert not same_weights(ours, make_tiny_llama(vocab_size=VOCAB))  # it trained


def preference_dataset() -> Dataset:
    words = "the king queen lord lady night spoke answered".split()
    gen = torch.Generator().manual_seed(1)

    def sentence(n):
        return " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=gen).tolist())

    rows = [{"prompt": sentence(4), "chosen": " " + sentence(3), "rejected": " " + sentence(3)} for _ in range(8)]
    return Dataset.from_list(rows)


def dpo_args(path, **overrides) -> dict:
    return common_args(path, learning_rate=1e-3, per_device_train_batch_size=2, max_steps=3, **overrides)


def test_dpo_with_cage_trains_logs_and_keeps_the_reference_dense(tmp_path, tokenizer):
    model = make_tiny_llama(vocab_size=VOCAB)
    start = copy.deepcopy(model.state_dict())
    trainer = CAGEDPOTrainer(
        model=model, args=CAGEDPOConfig(**dpo_args(tmp_path, cage_silence_ratio=0.0)),
        train_dataset=preference_dataset(), processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3 and all(e["cage/lambda"] > 0 and "cage/quant_error" in e for e in logs)
    assert len(list(quantized_layers(trainer.model))) == 14
    reference = trainer.ref_model
    assert quant_config_of(reference) is None and not list(quantized_layers(reference))
    assert all(torch.equal(reference.state_dict()[k], start[k]) for k in start)  # unchanged
    assert not torch.equal(
        trainer.model.model.layers[0].mlp.down_proj.weight, start["model.layers.0.mlp.down_proj.weight"]
    )


@pytest.mark.parametrize("cls", ["ready", "composed"])
def test_positional_arguments_reach_their_parameters(tmp_path, tokenizer, cls):
    """``DPOTrainer(model, ref_model, args, ...)``: the second positional slot is the reference model."""
    trainer_cls = CAGEDPOTrainer if cls == "ready" else type("T", (CAGETrainer, DPOTrainer), {})
    model, reference = make_tiny_llama(vocab_size=VOCAB), make_tiny_llama(seed=1, vocab_size=VOCAB)
    trainer = trainer_cls(
        model, reference, CAGEDPOConfig(**dpo_args(tmp_path)), None, preference_dataset(), processing_class=tokenizer
    )
    assert trainer.ref_model is reference and not list(quantized_layers(reference))
    assert len(list(quantized_layers(trainer.model))) == 14
    assert isinstance(trainer.args, CAGEDPOConfig)


def test_correction_attached_from_a_callback_equals_cage_trainer(tmp_path):
    """A ``TrainerCallback`` gets accelerate's optimizer wrapper; the correction attaches to the optimizer inside."""

    class AttachCAGE(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.correction = CAGECorrection(optimizer, model, cage_lambda=10.0, cage_silence_ratio=0.25,
                                             total_steps=state.max_steps)  # fmt: skip

    config = CAGEConfig(**common_args(tmp_path, cage_lambda=10.0))
    reference = make_tiny_llama(vocab_size=VOCAB)
    CAGETrainer(reference, config, train_dataset=token_dataset(), data_collator=collate).train()
    model = hf_cage.quantize_model(make_tiny_llama(vocab_size=VOCAB), config.quant_config())
    callback = AttachCAGE()
    plain = {k: v for k, v in common_args(tmp_path).items() if not k.startswith("cage_")}
    from transformers import TrainingArguments

    trainer = Trainer(
        model, TrainingArguments(**plain), train_dataset=token_dataset(), data_collator=collate, callbacks=[callback]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        trainer.train()
    assert callback.correction.optimizer is trainer.optimizer.optimizer  # the torch optimizer inside the wrapper
    assert callback.correction.steps_taken == 4
    assert same_weights(reference, model)


# ---- recipes/sft_llama.py: conversations, STE / CAGE / BF16, bad input ----

RECIPES = __import__("pathlib").Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))
sft_llama = __import__("importlib").import_module("sft_llama")
WORDS = "the king queen lord lady night spoke answered good noble speak come go make know".split()


def conversations(n: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)

    def sentence(k):
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=gen).tolist())

    return [
        {"messages": [{"role": "user", "content": sentence(5)}, {"role": "assistant", "content": sentence(6)}]}
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory, tokenizer):
    """A dense tiny checkpoint with the locally trained tokenizer (no chat template), and a conversation file."""
    import json

    root = tmp_path_factory.mktemp("sft")
    base = root / "base"
    make_tiny_llama(vocab_size=VOCAB).save_pretrained(base)
    tokenizer.save_pretrained(base)
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps(row) + "\n" for row in conversations(24, 0)))
    return base, chats


def sft_argv(chat_setup, out, method: str, *extra: str) -> list[str]:
    base, chats = chat_setup
    return [
        "--model_name_or_path", str(base), "--train_file", str(chats), "--method", method, "--output_dir", str(out),
        "--chat_template_path", str(RECIPES / "chat_template.jinja"), "--max_steps", "4", "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--use_cpu", "true",
        "--bf16", "false", "--gradient_checkpointing", "false", "--logging_steps", "1", "--disable_tqdm", "true",
        "--report_to", "none", "--save_strategy", "no", "--cage_silence_ratio", "0.5", *extra,
    ]  # fmt: skip


def test_sft_recipe_runs_bf16_ste_and_a_cage_branch(chat_setup, tmp_path):
    import json

    bf16 = sft_llama.run(sft_argv(chat_setup, tmp_path / "bf16", "bf16"))
    ste = sft_llama.run(sft_argv(chat_setup, tmp_path / "ste", "ste", "--save_branch_checkpoint"))
    branch = tmp_path / "ste" / "checkpoint-2"
    assert (branch / "trainer_state.json").is_file()
    cage = sft_llama.run(sft_argv(chat_setup, tmp_path / "cage", "cage", "--resume_from_checkpoint", str(branch)))
    assert (bf16["w_bits"], ste["cage_lambda"], cage["method"], cage["resumed_from"]) == (
        None,
        0.0,
        "cage",
        str(branch),
    )
    assert cage["cage_pull"] == hf_cage.optim.defaults.CAGE_PULL_DEFAULTS["fine-tuning"]
    assert cage["cage_pull_realised"] == pytest.approx(cage["cage_pull"], rel=1e-9)
    for run, out in ((bf16, "bf16"), (ste, "ste"), (cage, "cage")):
        assert run["steps"] == 4 and run["tokens"] > 0 and run["eval_loss"] < run["eval_loss_start"]
        folder = tmp_path / out
        assert json.loads((folder / "metrics.json").read_text())["eval_loss"] == run["eval_loss"]
        assert (folder / "log_history.json").is_file() and (folder / "loss_curve.png").is_file()
        assert (folder / "chat_template.jinja").is_file()  # the template travels with the model
    assert ste["eval_loss_start"] == cage["eval_loss_start"] != bf16["eval_loss_start"]  # quantized vs dense start
    assert cage["eval_loss"] != ste["eval_loss"]
    history = json.loads((tmp_path / "cage" / "log_history.json").read_text())
    assert [e["cage/lambda"] > 0 for e in history if "loss" in e] == [False, False, True, True]


def test_sft_recipe_assistant_only_loss_scores_the_assistant_tokens_only(chat_setup, tmp_path):
    full = sft_llama.run(sft_argv(chat_setup, tmp_path / "full", "ste", "--max_steps", "1"))
    ours = sft_llama.run(sft_argv(chat_setup, tmp_path / "asst", "ste", "--max_steps", "1", "--assistant_only_loss"))
    assert ours["assistant_only_loss"] and not full["assistant_only_loss"]
    assert ours["eval_loss_start"] != full["eval_loss_start"]  # another set of tokens scored


@pytest.mark.parametrize("form", ["jsonl", "json", "parquet", "folder", "text"])
def test_sft_recipe_reads_every_data_form(tmp_path, form):
    rows = conversations(3, 1) if form != "text" else [{"text": "the king spoke"}] * 3
    data = Dataset.from_list(rows)
    path = tmp_path / f"data.{form}"
    if form in ("jsonl", "text"):
        path = tmp_path / "data.jsonl"
        data.to_json(path)
    elif form == "json":
        path.write_text(__import__("json").dumps(rows))
    elif form == "parquet":
        data.to_parquet(path)
    else:
        data.save_to_disk(path)
    loaded = sft_llama.load_examples(str(path), "--train_file")
    assert loaded.to_list() == rows


@pytest.mark.parametrize("case", ["missing file", "no column", "no template", "text with assistant-only"])
def test_sft_recipe_bad_input_is_one_line_exit_2_and_nothing_written(chat_setup, tmp_path, capsys, case):
    base, chats = chat_setup
    out = tmp_path / "out"
    argv = sft_argv(chat_setup, out, "cage")
    if case == "missing file":
        argv += ["--train_file", str(tmp_path / "nope.jsonl")]
        expected = "no such file"
    elif case == "no column":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "a", "answer": "b"}\n')
        argv += ["--train_file", str(bad)]
        expected = "no 'messages' or 'text' column"
    elif case == "no template":
        argv = [a for a in argv if a not in ("--chat_template_path", str(RECIPES / "chat_template.jinja"))]
        expected = "has no chat template"
    else:
        text = tmp_path / "text.jsonl"
        text.write_text('{"text": "the king spoke"}\n' * 4)
        argv += ["--train_file", str(text), "--assistant_only_loss"]
        expected = "--assistant_only_loss needs conversations"
    capsys.readouterr()
    assert sft_llama.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sft_llama.py: error: ") and expected in err[0], err
    assert not out.exists()


STOCK_CHAT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(path)
ids = tokenizer.apply_chat_template([{"role": "user", "content": "the king spoke"}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]
out = model.generate(ids, max_new_tokens=3, do_sample=False, min_new_tokens=3)
assert out.shape[1] == ids.shape[1] + 3, out.shape
assert "hf_cage" not in sys.modules
print("ok")
"""


def test_export_of_an_sft_run_has_its_training_and_chat_template_and_serves_in_stock_transformers(tmp_path, tokenizer):
    """Final save and checkpoint-N of a CAGESFTTrainer run (W4A16 int, group 32: a format stock loaders serve)."""
    from hf_cage.export import export_checkpoint

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = (RECIPES / "chat_template.jinja").read_text()
    quant = dict(quant_quantizer="int", quant_a_bits=0, quant_granularity="group", quant_group_size=32)
    args = CAGESFTConfig(**sft_only(common_args(tmp_path / "run", save_strategy="steps", save_steps=2, **quant)))
    trainer = CAGESFTTrainer(
        make_tiny_llama(vocab_size=VOCAB), args, train_dataset=Dataset.from_list(conversations(16, 2)),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    tokenizer.save_pretrained(tmp_path / "final")
    for source in (tmp_path / "final", tmp_path / "run" / "checkpoint-4"):
        out = tmp_path / f"export-{source.name}"
        export_checkpoint(source, out, progress=False, log=None)
        card = (out / "README.md").read_text()
        assert "## Training" in card and "| steps | 4 |" in card and "![loss curve](loss_curve.png)" in card
        assert (out / "loss_curve.png").stat().st_size > 1000
        assert (out / "chat_template.jinja").read_text() == tokenizer.chat_template
        done = subprocess.run([sys.executable, "-c", STOCK_CHAT, str(out)], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]

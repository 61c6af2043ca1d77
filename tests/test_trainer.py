"""CAGEConfig parsing/validation and CAGETrainer runs on a tiny Llama (CPU, a few steps)."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from conftest import make_tiny_llama

from hf_cage import CAGE, CAGEConfig, CAGECorrection, CAGETrainer, QATLinear, quantized_layers


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 16):
        gen = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 128, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def config(tmp_path, **overrides) -> CAGEConfig:
    values = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        cage_lambda=10.0,
        cage_silence_ratio=0.5,
        disable_tqdm=True,
    )
    values.update(overrides)
    return CAGEConfig(**values)


def train_logs(trainer) -> dict[int, dict]:
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


def test_three_step_run_logs_cage_metrics(tmp_path):
    model = make_tiny_llama()
    trainer = CAGETrainer(model, config(tmp_path, lr_scheduler_type="cosine", warmup_steps=1), train_dataset=Blocks())
    assert len(list(quantized_layers(model))) == 14  # quantized at construction
    trainer.train()
    assert isinstance(trainer.cage_optimizer(), CAGE)
    assert trainer.cage_optimizer().param_groups[0]["total_steps"] == 3
    logs = train_logs(trainer)
    assert sorted(logs) == [1, 2, 3]
    assert [logs[s]["cage/lambda"] for s in (1, 2, 3)] == pytest.approx([0.0, 10.0 / 3, 10.0])
    for entry in logs.values():
        assert 0 < entry["cage/quant_error"] < 1
        assert 0 <= entry["cage/clip_fraction"] < 0.5


def test_gradient_accumulation_reaches_end_lambda_on_last_optimizer_step(tmp_path):
    args = config(tmp_path, max_steps=4, gradient_accumulation_steps=4, per_device_train_batch_size=1)
    trainer = CAGETrainer(make_tiny_llama(), args, train_dataset=Blocks())
    trainer.train()
    logs = train_logs(trainer)
    assert [logs[s]["cage/lambda"] for s in (1, 2, 3, 4)] == pytest.approx([0.0, 0.0, 5.0, 10.0])
    assert trainer.cage_optimizer().param_groups[0]["cage_step"] == 4


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    args = dict(max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="cosine")
    full = CAGETrainer(make_tiny_llama(), config(tmp_path / "full", **args), train_dataset=Blocks())
    full.train()
    resumed = CAGETrainer(make_tiny_llama(seed=5), config(tmp_path / "resumed", **args), train_dataset=Blocks())
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.cage_optimizer().param_groups[0]["cage_step"] == 6
    expected, got = _weights(full.model), _weights(resumed.model)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=0, rtol=0, msg=name)
    assert train_logs(resumed)[6]["cage/lambda"] == 10.0


def test_resume_an_ste_checkpoint_with_a_new_lambda_branches_cage(tmp_path):
    args = dict(max_steps=4, save_strategy="steps", save_steps=2)
    ste = CAGETrainer(make_tiny_llama(), config(tmp_path / "ste", cage_lambda=0.0, **args), train_dataset=Blocks())
    ste.train()
    assert [e["cage/lambda"] for e in train_logs(ste).values()] == [0.0] * 4
    branch = CAGETrainer(
        make_tiny_llama(), config(tmp_path / "cage", cage_lambda=10.0, **args), train_dataset=Blocks()
    )
    branch.train(resume_from_checkpoint=str(tmp_path / "ste" / "checkpoint-2"))
    opt = branch.cage_optimizer()
    assert opt.param_groups[0]["cage_lambda"] == 10.0
    logs = train_logs(branch)
    assert [logs[s]["cage/lambda"] for s in (3, 4)] == pytest.approx([5.0, 10.0])


def test_bf16_autocast_on_cpu(tmp_path):
    trainer = CAGETrainer(make_tiny_llama(), config(tmp_path, max_steps=2, bf16=True), train_dataset=Blocks())
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert "cage/quant_error" in train_logs(trainer)[2]
    assert all(layer.weight.dtype == torch.float32 for _, layer in quantized_layers(trainer.model))


def test_user_optimizers_get_the_correction(tmp_path):
    model = make_tiny_llama()
    sgd = torch.optim.SGD(model.parameters(), lr=1e-2)
    trainer = CAGETrainer(model, config(tmp_path, max_steps=2), train_dataset=Blocks(), optimizers=(sgd, None))
    trainer.train()
    wrapper = trainer.cage_optimizer()
    assert isinstance(wrapper, CAGECorrection) and wrapper.optimizer is sgd
    assert wrapper.total_steps == 2
    assert train_logs(trainer)[2]["cage/lambda"] == 10.0

    trainer = CAGETrainer(
        make_tiny_llama(),
        config(tmp_path, max_steps=2),
        train_dataset=Blocks(),
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
    )
    trainer.train()
    wrapper = trainer.cage_optimizer()
    assert isinstance(wrapper, CAGECorrection) and isinstance(wrapper.optimizer, torch.optim.SGD)


def test_already_quantized_model_is_kept(tmp_path):
    from hf_cage import QuantConfig, quantize_model

    model = quantize_model(make_tiny_llama(), QuantConfig(w_bits=3, a_bits=None))
    CAGETrainer(model, config(tmp_path), train_dataset=Blocks())
    assert all(layer.quant_config.w_bits == 3 for _, layer in quantized_layers(model))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(cage_lambda=-1.0), "cage_lambda"),
        (dict(cage_silence_ratio=1.0), "cage_silence_ratio"),
        (dict(cage_silence_ratio=-0.1), "cage_silence_ratio"),
        (dict(cage_schedule="cosine"), "cage_schedule"),
        (dict(cage_variant="both"), "cage_variant"),
        (dict(quant_w_bits=5), "quant_w_bits"),
        (dict(quant_a_bits=6), "quant_a_bits"),
        (dict(quant_quantizer="nf4"), "quant_quantizer"),
        (dict(quant_granularity="tensor"), "quant_granularity"),
        (dict(quant_clip="percentile"), "quant_clip"),
        (dict(quant_granularity="group", quant_group_size=48), "quant_group_size"),
        (dict(quant_group_size=32), "group_size"),
    ],
)
def test_bad_config_raises_naming_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        config(tmp_path, **overrides)


def test_config_parses_from_the_command_line(tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(CAGEConfig)
    argv = ["--output_dir", str(tmp_path), "--quant_a_bits", "0", "--quant_w_bits", "3", "--cage_lambda", "0"]
    (args,) = parser.parse_args_into_dataclasses(argv + ["--quant_quantizer", "int", "--quant_hadamard", "true"])
    quant = args.quant_config()
    assert (quant.w_bits, quant.a_bits, quant.quantizer, quant.hadamard) == (3, None, "int", True)
    assert args.cage_lambda == 0.0
    (default,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert default.quant_config().a_bits == 4 and default.cage_kwargs()["cage_schedule"] == "linear_ramp"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "weight-only" in out.getvalue() and "--cage_silence_ratio" in out.getvalue()


def test_trainer_rejects_plain_training_arguments(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="CAGEConfig"):
        CAGETrainer(make_tiny_llama(), TrainingArguments(output_dir=str(tmp_path), use_cpu=True))
    assert QATLinear  # public re-export used by users of the trainer


def test_coupled_variant_runs_with_cage_and_is_refused_for_user_optimizers(tmp_path):
    trainer = CAGETrainer(
        make_tiny_llama(), config(tmp_path, max_steps=2, cage_variant="coupled"), train_dataset=Blocks()
    )
    trainer.train()
    assert trainer.cage_optimizer().param_groups[0]["cage_variant"] == "coupled"
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="cage_variant"):
        CAGETrainer(
            model,
            config(tmp_path, cage_variant="coupled"),
            train_dataset=Blocks(),
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )

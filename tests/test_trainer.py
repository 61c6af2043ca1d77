"""CAGEConfig parsing/validation and CAGETrainer runs on a tiny Llama (CPU, a few steps).

The Trainer-level contract is checked against things written out here, not against hf-cage's own code:
a few CAGETrainer steps equal, weight for weight, a hand-written AdamW loop on the same batches with the
correction and the lambda / LR schedules spelled out; the logged metrics equal their formulas computed
from the model at each logging step; the quantized layers' outputs are bf16 under bf16 autocast.
"""

from __future__ import annotations

import contextlib
import io
import types

import pytest
import torch
from conftest import make_tiny_llama
from transformers import TrainerCallback

from hf_cage import CAGEConfig, CAGECorrection, CAGETrainer, QATLinear, quantize_model, quantized_layers


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
    correction = trainer.cage_correction
    assert isinstance(correction, CAGECorrection) and isinstance(correction.optimizer, torch.optim.AdamW)
    assert correction.total_steps == 3 and correction.steps_taken == 3
    logs = train_logs(trainer)
    assert sorted(logs) == [1, 2, 3]
    assert [logs[s]["cage/lambda"] for s in (1, 2, 3)] == pytest.approx([0.0, 10.0 / 3, 10.0])
    for entry in logs.values():
        assert 0 < entry["cage/quant_error"] < 1
        assert 0 < entry["cage/clip_fraction"] < 0.5


def test_gradient_accumulation_reaches_end_lambda_on_last_optimizer_step(tmp_path):
    args = config(tmp_path, max_steps=4, gradient_accumulation_steps=4, per_device_train_batch_size=1)
    trainer = CAGETrainer(make_tiny_llama(), args, train_dataset=Blocks())
    trainer.train()
    logs = train_logs(trainer)
    assert [logs[s]["cage/lambda"] for s in (1, 2, 3, 4)] == pytest.approx([0.0, 0.0, 5.0, 10.0])
    assert trainer.cage_correction.steps_taken == 4


# ---- A few CAGETrainer steps == a hand-written loop ----


class RecordingTrainer(CAGETrainer):
    """Records every micro-batch and the token count Trainer normalises the loss by."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches.append((inputs["input_ids"].clone(), num_items_in_batch))
        return super().training_step(model, inputs, num_items_in_batch)


def hand_written_run(args: CAGEConfig, batches, steps: int) -> torch.nn.Module:
    """AdamW + CAGE written out: linear LR decay, linear-ramp lambda, clipping, accumulation, decay on QATLinears."""
    model = quantize_model(make_tiny_llama(), args.quant_config()).train()
    layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, QATLinear)}
    decay = [p for n, p in model.named_parameters() if n in layers]
    rest = [p for n, p in model.named_parameters() if n not in layers]
    lr, lam, s, ga = args.learning_rate, args.cage_lambda, args.cage_silence_ratio, args.gradient_accumulation_steps
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        fused=args.optim == "adamw_torch_fused",
    )  # fmt: skip
    for t in range(1, steps + 1):
        for ids, n_items in batches[(t - 1) * ga : t * ga]:
            model(input_ids=ids, labels=ids, num_items_in_batch=n_items).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        lr_t = lr * (float(steps - (t - 1)) / float(steps))  # "linear" schedule, no warmup
        lam_t = lam * min(1.0, (t / steps - s) / (1.0 - s)) if t / steps > s else 0.0  # docs/method.md#lambda-schedule
        for group in opt.param_groups:
            group["lr"] = lr_t
        with torch.no_grad():
            if args.cage_variant == "coupled":
                for w in decay:  # grad += lam_t * (w - Q(w))
                    w.grad.add_(w - layers[_name(model, w)].weight_quantizer(w), alpha=lam_t)
        opt.step()
        with torch.no_grad():
            if args.cage_variant == "decoupled":
                for w in decay:  # w - lr_t * lam_t * (w - Q(w)), as torch's lerp rounds it
                    w.lerp_(layers[_name(model, w)].weight_quantizer(w), lr_t * lam_t)
        opt.zero_grad()
    return model


def _name(model, param) -> str:
    return next(n for n, p in model.named_parameters() if p is param)


@pytest.mark.parametrize("variant", ["decoupled", "coupled"])
def test_trainer_steps_equal_a_hand_written_loop(tmp_path, variant):
    steps = 4
    args = config(
        tmp_path, max_steps=steps, gradient_accumulation_steps=2, max_grad_norm=0.5, weight_decay=0.1,
        cage_lambda=8.0, cage_silence_ratio=0.25, cage_variant=variant, lr_scheduler_type="linear", learning_rate=2e-2,
    )  # fmt: skip
    trainer = RecordingTrainer(make_tiny_llama(), args, train_dataset=Blocks())
    trainer.batches = []
    trainer.train()
    assert len(trainer.batches) == steps * 2
    expected = hand_written_run(args, trainer.batches, steps)
    got = dict(trainer.model.named_parameters())
    moved = 0
    for name, p in expected.named_parameters():
        torch.testing.assert_close(got[name], p, atol=0, rtol=0, msg=name)
        moved += not torch.equal(p, make_tiny_llama().get_parameter(name))
    assert moved == len(got)
    # The correction is large here: without it the weights end far from the trained ones.
    no_cage = hand_written_run(CAGEConfig(**{**args.to_dict(), "cage_lambda": 0.0}), trainer.batches, steps)
    gap = max((got[n] - p).abs().max().item() for n, p in no_cage.named_parameters())
    assert gap > 1e-3


# ---- Logged metrics == their formulas ----


def sylvester_hadamard(block: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / block**0.5


def expected_metrics(model) -> tuple[float, float]:
    """quant_error = mean over quantized layers of ||W - Q(W)||_F / ||W||_F;
    clip_fraction = (entries with |R| > s + step / 2) / (all entries): R = W in the Hadamard basis (each block of
    a row times the normalized Sylvester Hadamard), s = alpha_4 * RMS(row of R) the clip value and
    step = 2 s / (2^4 - 1) of the QuEST grid, whose outermost levels are +-s: beyond s + step / 2 the
    straight-through mask is off."""
    errors, clipped, total = [], 0, 0
    for layer in (m for m in model.modules() if isinstance(m, QATLinear)):
        w = layer.weight.detach().float()
        errors.append((torch.linalg.norm(w - layer.weight_quantizer(w)) / torch.linalg.norm(w)).item())
        block = layer.weight_spec.hadamard_block
        r = (w.reshape(w.shape[0], -1, block) @ sylvester_hadamard(block)).reshape(w.shape)
        clip = layer.weight_spec.clip_alpha * r.square().mean(-1, keepdim=True).sqrt()
        step = 2 * clip / (2**4 - 1)
        clipped += int((r.abs() > clip + step / 2).sum())
        total += r.numel()
    return sum(errors) / len(errors), clipped / total


class MetricsCheck(TrainerCallback):
    def __init__(self):
        self.checked = []

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if "cage/quant_error" in logs:
            self.checked.append((logs["cage/quant_error"], logs["cage/clip_fraction"], *expected_metrics(model)))


def test_logged_metrics_equal_their_formulas(tmp_path):
    check = MetricsCheck()
    args = config(tmp_path, max_steps=3, cage_silence_ratio=0.0, cage_lambda=30.0, learning_rate=3e-2)
    trainer = CAGETrainer(make_tiny_llama(), args, train_dataset=Blocks(), callbacks=[check])
    trainer.train()
    assert len(check.checked) == 3
    for error, clip_fraction, expected_error, expected_clip in check.checked:
        assert error == pytest.approx(expected_error, rel=1e-5)
        assert clip_fraction == pytest.approx(expected_clip, abs=2e-4)
        assert expected_clip > 2e-3  # a few percent of Gaussian-like entries lie beyond 2.5 RMS
    errors = [c[0] for c in check.checked]
    assert errors[2] < errors[0]  # the pull shrinks the quantization error


@pytest.mark.parametrize("quantizer", ["int", "nvfp4"])
def test_layer_statistics_stay_on_the_weights_device(quantizer):
    # meta stands in for CUDA on a CPU machine: a CPU tensor stacked with them raises a mixed-device error
    from hf_cage import QuantConfig
    from hf_cage.trainer.metrics import layer_statistics

    model = quantize_model(make_tiny_llama(), QuantConfig(quantizer=quantizer))
    _, layer = next(iter(quantized_layers(model)))
    stats = layer_statistics(layer.weight.detach().to("meta"), layer.weight_spec)
    assert stats.device.type == "meta" and stats.shape == (4,) and stats.dtype == torch.float64


# ---- Runs, schedules, resume ----


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    args = dict(max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="cosine")
    full = CAGETrainer(make_tiny_llama(), config(tmp_path / "full", **args), train_dataset=Blocks())
    full.train()
    resumed = CAGETrainer(make_tiny_llama(seed=5), config(tmp_path / "resumed", **args), train_dataset=Blocks())
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.cage_correction.steps_taken == 6
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
    assert branch.cage_correction.cage_lambda == 10.0
    logs = train_logs(branch)
    assert [logs[s]["cage/lambda"] for s in (3, 4)] == pytest.approx([5.0, 10.0])


def test_a_second_train_call_gets_the_schedule_of_its_own_run(tmp_path):
    trainer = CAGETrainer(make_tiny_llama(), config(tmp_path, max_steps=2), train_dataset=Blocks())
    trainer.train()
    assert [e["cage/lambda"] for e in train_logs(trainer).values()] == [0.0, 10.0]
    trainer.args.max_steps = 8
    trainer.train()
    assert [e["cage/lambda"] for e in train_logs(trainer).values()] == [0.0] * 4 + [2.5, 5.0, 7.5, 10.0]
    assert trainer.cage_correction.total_steps == 8 and trainer.cage_correction.steps_taken == 8


class OutOfMemoryOnce(CAGETrainer):
    """Fails the first attempt's second step the way a CUDA OOM does, so auto_find_batch_size retries."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._train_batch_size == 8 and self.state.global_step == 1:
            raise RuntimeError("CUDA out of memory. (simulated)")
        return super().training_step(model, inputs, num_items_in_batch)


def test_auto_find_batch_size_retry_gets_the_schedule_of_the_retried_run(tmp_path):
    args = config(tmp_path, max_steps=-1, num_train_epochs=1, per_device_train_batch_size=8, auto_find_batch_size=True)
    trainer = OutOfMemoryOnce(make_tiny_llama(), args, train_dataset=Blocks())
    trainer.train()
    assert trainer._train_batch_size == 7  # accelerate retries with 90% of the batch: 32 blocks in 5 steps
    assert trainer.state.global_step == 5 and trainer.cage_correction.total_steps == 5
    # s = 0.5 of T = 5: silent while t/5 <= 0.5, then 10 * (t/5 - 0.5) / 0.5
    assert [e["cage/lambda"] for e in train_logs(trainer).values()] == pytest.approx([0.0, 0.0, 2.0, 6.0, 10.0])


def test_bf16_autocast_on_cpu_keeps_quantized_outputs_in_bf16(tmp_path):
    trainer = CAGETrainer(make_tiny_llama(), config(tmp_path, max_steps=2, bf16=True), train_dataset=Blocks())
    dtypes = []
    for _, layer in quantized_layers(trainer.model):
        layer.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert "cage/quant_error" in train_logs(trainer)[2]
    assert len(dtypes) == 2 * 14 and set(dtypes) == {torch.bfloat16}
    assert all(layer.weight.dtype == torch.float32 for _, layer in quantized_layers(trainer.model))


# ---- Optimizers: --optim, user optimizers, coupled ----


def test_optim_flag_goes_through_trainer(tmp_path):
    """--optim adamw_torch(_fused): AdamW + CAGE; --optim sgd: SGD + decoupled correction; coupled + sgd refused."""
    for optim, cls in (("adamw_torch", torch.optim.AdamW), ("adamw_torch_fused", torch.optim.AdamW)):
        trainer = CAGETrainer(make_tiny_llama(), config(tmp_path, max_steps=2, optim=optim), train_dataset=Blocks())
        trainer.train()
        inner = trainer.cage_correction.optimizer
        assert type(inner) is cls and bool(inner.defaults["fused"]) == (optim == "adamw_torch_fused")
        assert [g["weight_decay"] for g in inner.param_groups] == [0.0, 0.0]  # TrainingArguments' default
    trainer = CAGETrainer(
        make_tiny_llama(), config(tmp_path, max_steps=2, optim="sgd", weight_decay=0.1), train_dataset=Blocks()
    )
    trainer.train()
    inner = trainer.cage_correction.optimizer
    assert type(inner) is torch.optim.SGD and trainer.cage_correction.steps_taken == 2
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decayed = sorted(names[id(p)] for g in inner.param_groups if g["weight_decay"] > 0 for p in g["params"])
    assert decayed == sorted(f"{n}.weight" for n, _ in quantized_layers(trainer.model))
    assert train_logs(trainer)[2]["cage/lambda"] == 10.0
    coupled = CAGETrainer(
        make_tiny_llama(), config(tmp_path, max_steps=2, optim="sgd", cage_variant="coupled"), train_dataset=Blocks()
    )
    with pytest.raises(ValueError, match="cage_variant='coupled'.*SGD"):
        coupled.train()


def test_user_optimizers_get_the_correction(tmp_path):
    model = make_tiny_llama()
    sgd = torch.optim.SGD(model.parameters(), lr=1e-2)
    trainer = CAGETrainer(model, config(tmp_path, max_steps=2), train_dataset=Blocks(), optimizers=(sgd, None))
    trainer.train()
    assert trainer.cage_correction.optimizer is sgd
    assert trainer.cage_correction.total_steps == 2
    assert train_logs(trainer)[2]["cage/lambda"] == 10.0

    trainer = CAGETrainer(
        make_tiny_llama(),
        config(tmp_path, max_steps=2),
        train_dataset=Blocks(),
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
    )
    trainer.train()
    assert isinstance(trainer.cage_correction.optimizer, torch.optim.SGD)

    class NotATorchOptimizerFactory:  # Trainer's factory protocol (Muon, Dion); what it builds is no torch optimizer
        def __call__(self, model, **kwargs):
            return types.SimpleNamespace(param_groups=[{"params": list(model.parameters())}])

    trainer = CAGETrainer(make_tiny_llama(), config(tmp_path, max_steps=2), train_dataset=Blocks(),
                          optimizer_cls_and_kwargs=(NotATorchOptimizerFactory, {}))  # fmt: skip
    with pytest.raises(ValueError, match="not a torch.optim.Optimizer"):
        trainer.train()
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="cage_variant"):
        CAGETrainer(
            model,
            config(tmp_path, cage_variant="coupled"),
            train_dataset=Blocks(),
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )


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


@pytest.mark.parametrize(
    "overrides",
    [
        dict(quant_quantizer="nvfp4", quant_group_size=16),
        dict(quant_quantizer="mxfp4", quant_granularity="group", quant_group_size=32),
        dict(quant_quantizer="int", quant_clip="minmax"),
    ],
)
def test_config_accepts_what_quant_config_accepts(tmp_path, overrides):
    from hf_cage import QuantConfig

    expected = QuantConfig(**{k.removeprefix("quant_"): v for k, v in overrides.items()})
    assert config(tmp_path, **overrides).quant_config() == expected


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


def test_fsdp1_and_a_silently_unsharded_fsdp_launch_are_refused(tmp_path, monkeypatch):
    from types import SimpleNamespace

    trainer = CAGETrainer(make_tiny_llama(), config(tmp_path), train_dataset=Blocks())
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    monkeypatch.setattr(trainer, "accelerator", SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(
        fsdp_version=1))))  # fmt: skip
    with pytest.raises(ValueError, match="FSDP1.*use FSDP2: fsdp_version: 2"):
        trainer._check_fsdp()
    trainer.accelerator.state.fsdp_plugin.fsdp_version = 2
    trainer._check_fsdp()
    monkeypatch.setattr(trainer, "is_fsdp_enabled", False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(ValueError, match="did not enable FSDP"):
        trainer._check_fsdp()


def test_trainer_rejects_plain_training_arguments(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="CAGEConfig"):
        CAGETrainer(make_tiny_llama(), TrainingArguments(output_dir=str(tmp_path), use_cpu=True))

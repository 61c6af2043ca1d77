"""``cage_pull``: the trainer picks lambda so that the run realises ``sum_t lr_t * lambda_t == cage_pull``.

The realised pull is summed here from what the optimizer actually ran with: the learning rate of the
quantized weights' param group read at every optimizer step (a callback), times the lambda the run logged
for that step.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from transformers import TrainerCallback

from hf_cage import CAGEConfig, CAGETrainer


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 8):
        self.ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(3))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class LearningRates(TrainerCallback):
    """The LR of the quantized weights' group (the first) at each optimizer step, keyed by step (1-based)."""

    def __init__(self):
        self.rates: dict[int, float] = {}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.rates[state.global_step + 1] = float(optimizer.param_groups[0]["lr"])


def args(path, **overrides) -> CAGEConfig:
    values = dict(
        output_dir=str(path), per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, cage_silence_ratio=0.5,
    )  # fmt: skip
    values.update(overrides)
    return CAGEConfig(**values)


def realised(trainer, rates: LearningRates) -> float:
    lambdas = {e["step"]: e["cage/lambda"] for e in trainer.state.log_history if "cage/lambda" in e}
    return sum(rates.rates[t] * lambdas[t] for t in rates.rates)


SCHEDULES = {
    "cosine_with_min_lr": dict(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                               warmup_steps=0.1),
    "linear": dict(lr_scheduler_type="linear"),
    "constant_with_warmup": dict(lr_scheduler_type="constant_with_warmup", warmup_steps=3),
}  # fmt: skip


@pytest.mark.parametrize("steps", [7, 20])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_realised_pull_equals_the_request(tmp_path, schedule, steps):
    pull = 0.05
    rates = LearningRates()
    trainer = CAGETrainer(
        make_tiny_llama(),
        args(tmp_path, max_steps=steps, cage_pull=pull, **SCHEDULES[schedule]),
        train_dataset=Blocks(),
        callbacks=[rates],
    )
    trainer.train()
    assert sorted(rates.rates) == list(range(1, steps + 1))
    assert realised(trainer, rates) == pytest.approx(pull, rel=1e-9)
    summary = trainer.state.log_history[-1]
    assert summary["cage/pull"] == pytest.approx(pull, rel=1e-9)
    assert summary["cage/peak_lambda"] == trainer.cage_correction.cage_lambda > 0
    assert trainer.args.cage_lambda is None  # the knob stays a pull: a second train() picks its own lambda


def test_constant_lambda_schedule_and_gradient_accumulation(tmp_path):
    rates = LearningRates()
    overrides = dict(max_steps=6, gradient_accumulation_steps=2, cage_schedule="constant", lr_scheduler_type="cosine")
    trainer = CAGETrainer(
        make_tiny_llama(), args(tmp_path, cage_pull=0.02, **overrides), train_dataset=Blocks(), callbacks=[rates]
    )
    trainer.train()
    assert realised(trainer, rates) == pytest.approx(0.02, rel=1e-9)


def test_a_branched_run_realises_the_pull_of_the_whole_run(tmp_path):
    """STE to the end of silence, then CAGE resumed from there: the pull counts over the whole run's schedule."""
    common = dict(max_steps=8, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1})
    ste = CAGETrainer(
        make_tiny_llama(),
        args(tmp_path / "ste", cage_lambda=0.0, save_strategy="steps", save_steps=4, **common),
        train_dataset=Blocks(),
    )
    ste.train()
    rates = LearningRates()
    branch = CAGETrainer(
        make_tiny_llama(), args(tmp_path / "cage", cage_pull=0.03, **common), train_dataset=Blocks(), callbacks=[rates]
    )
    branch.train(resume_from_checkpoint=str(tmp_path / "ste" / "checkpoint-4"))
    assert sorted(rates.rates) == [5, 6, 7, 8]
    assert realised(branch, rates) == pytest.approx(0.03, rel=1e-9)
    assert branch.cage_correction.pull_realised == pytest.approx(0.03, rel=1e-9)


def test_cage_pull_with_cage_lambda_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cage_pull=1 and cage_lambda=10 both set"):
        args(tmp_path, cage_pull=1.0, cage_lambda=10.0)
    with pytest.raises(ValueError, match="cage_pull=-1"):
        args(tmp_path, cage_pull=-1.0)
    assert args(tmp_path).cage_lambda == 10.0 and args(tmp_path, cage_pull=1.0).cage_lambda is None


def test_a_scheduler_without_known_rates_is_refused(tmp_path):
    trainer = CAGETrainer(
        make_tiny_llama(),
        args(tmp_path, max_steps=3, cage_pull=0.1, lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps"),
        train_dataset=Blocks(),
        eval_dataset=Blocks(4),
    )
    with pytest.raises(ValueError, match="cage_pull needs the learning rate of every step"):
        trainer.train()

"""What a paired BF16 / STE / CAGE comparison needs from the Trainer: checkpoints to branch from, and a BF16
baseline that decays what ``CAGETrainer`` decays.

A CAGE run resumed from an STE run's checkpoint at the end of CAGE's silence period (``Trainer.train(
resume_from_checkpoint=...)`` with the CAGE arguments) shares every earlier step with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from transformers import Trainer, TrainerCallback

from ..optim import cage_lambda, decay_parameter_names


def silence_end_step(total_steps: int, silence_ratio: float) -> int:
    """The last optimizer step of CAGE's silence period of a ``total_steps`` run (0 when there is none), as
    :func:`hf_cage.cage_lambda` decides it."""
    step = min(total_steps, int(silence_ratio * total_steps))
    while step < total_steps and cage_lambda(step + 1, total_steps, 1.0, silence_ratio, "constant") == 0:
        step += 1
    while step > 0 and cage_lambda(step, total_steps, 1.0, silence_ratio, "constant") != 0:
        step -= 1
    return step


class SaveCheckpointsAt(TrainerCallback):
    """Save a full Trainer checkpoint (weights, optimizer, LR schedule, RNG, data position) at the optimizer steps
    ``steps_of(max_steps)`` returns.

    ``message``, a format string with ``{path}``, is printed by the main process for each such checkpoint saved.
    """

    def __init__(self, steps_of: Callable[[int], Iterable[int]], message: str | None = None):
        self.steps_of, self.message = steps_of, message

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in set(self.steps_of(state.max_steps)):
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.message and state.is_world_process_zero and state.global_step in set(self.steps_of(state.max_steps)):
            print(self.message.format(path=Path(args.output_dir) / f"checkpoint-{state.global_step}"))
        return control


def branch_checkpoint_callback(silence_ratio: float, message: str | None = None) -> SaveCheckpointsAt:
    """A checkpoint at :func:`silence_end_step` of the run (none when the run has no silence period)."""
    return SaveCheckpointsAt(lambda total: {silence_end_step(total, silence_ratio)} - {0}, message)


def block_decay_trainer_class(base: type[Trainer] = Trainer) -> type[Trainer]:
    """``base`` whose weight decay follows hf-cage's policy on a dense model: only the block linears
    ``args.quant_config()`` targets (what ``CAGETrainer`` decays), not embeddings, ``lm_head`` or norms, so that
    an unquantized baseline is like-for-like with its STE and CAGE runs. ``args`` must be a ``CAGEArguments``."""

    class BlockDecayTrainer(base):
        def get_decay_parameter_names(self, model) -> list[str]:
            return decay_parameter_names(model, self.args.quant_config())

    return BlockDecayTrainer

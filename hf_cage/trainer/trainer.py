"""``CAGETrainer``: ``transformers.Trainer`` that quantizes the model and trains it with CAGE.

It is :class:`hf_cage.trainer.mixin.CAGETrainerMixin` over ``Trainer`` (everything CAGE adds is described
there); everything else, the optimizer included, is Trainer's own code path.
"""

from __future__ import annotations

from transformers import Trainer

from .mixin import CAGETrainerMixin


class CAGETrainer(CAGETrainerMixin, Trainer):
    """A ``Trainer`` for CAGE quantization-aware training; ``args`` must be a :class:`hf_cage.CAGEConfig`.

    ``self.cage_correction`` is the :class:`hf_cage.CAGECorrection` attached to the optimizer (``None``
    until the optimizer exists).
    """

"""CAGE in TRL's trainers: ``CAGESFTTrainer`` / ``CAGESFTConfig`` and ``CAGEDPOTrainer`` / ``CAGEDPOConfig``.

Each is :class:`hf_cage.CAGETrainerMixin` over TRL's trainer and :class:`hf_cage.CAGEArguments` over TRL's
config: TRL's defaults and behaviour are kept; the model is quantized and trained with CAGE. The DPO reference
model stays dense (a dense copy of the model, taken before quantization, when none is given). Any other TRL
trainer takes CAGE the same way, in two lines::

    @dataclass
    class CAGEKTOConfig(CAGEArguments, KTOConfig): ...
    class CAGEKTOTrainer(CAGETrainerMixin, KTOTrainer): ...

Needs ``trl`` (``pip install hf-cage[trl]``); ``import hf_cage`` never imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from .trainer import CAGEArguments, CAGETrainerMixin


@dataclass
class CAGESFTConfig(CAGEArguments, SFTConfig):
    """``trl.SFTConfig`` (its defaults unchanged) plus hf-cage's ``quant_*`` / ``cage_*`` fields."""


class CAGESFTTrainer(CAGETrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` with CAGE quantization-aware training; ``args`` is a :class:`CAGESFTConfig`."""


@dataclass
class CAGEDPOConfig(CAGEArguments, DPOConfig):
    """``trl.DPOConfig`` (its defaults unchanged) plus hf-cage's ``quant_*`` / ``cage_*`` fields."""


class CAGEDPOTrainer(CAGETrainerMixin, DPOTrainer):
    """``trl.DPOTrainer`` with CAGE on the policy model; the reference model stays dense (``args``: a
    :class:`CAGEDPOConfig`)."""


__all__ = ["CAGEDPOConfig", "CAGEDPOTrainer", "CAGESFTConfig", "CAGESFTTrainer"]

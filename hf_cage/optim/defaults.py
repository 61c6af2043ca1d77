"""hf-cage's CAGE defaults, the one place they are written (every signature, help text and recipe reads them here).

- ``CAGE_LAMBDA`` / ``CAGE_SILENCE_RATIO`` / ``CAGE_SCHEDULE`` / ``CAGE_VARIANT``: the reference scripts' published
  settings, the defaults of :class:`hf_cage.CAGE`, :class:`hf_cage.CAGECorrection` and :class:`hf_cage.CAGEConfig`
  when no ``cage_pull`` is asked for.
- ``CAGE_PULL_DEFAULTS``: the total pull ``sum_t lr_t * lambda_t`` the recipes ask for per job (``cage_pull``);
  docs/training.md ("Strength and schedule") says where each value comes from.
"""

from __future__ import annotations

CAGE_LAMBDA = 10.0
CAGE_SILENCE_RATIO = 0.8
CAGE_SCHEDULE = "linear_ramp"
CAGE_VARIANT = "decoupled"

CAGE_PULL_DEFAULTS = {"pretraining": 2.0, "fine-tuning": 0.2}

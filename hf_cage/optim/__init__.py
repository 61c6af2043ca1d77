"""The CAGE correction (attached to any optimizer), AdamW + CAGE, lambda schedules, factory."""

from .cage import CAGE
from .correction import CAGECorrection, cage_correction_of, weight_quantizers_of
from .factory import cage_param_groups, create_cage_optimizer, decay_parameter_names
from .schedule import SCHEDULES, VARIANTS, cage_lambda, check_cage_hyperparameters

__all__ = [
    "CAGE",
    "SCHEDULES",
    "VARIANTS",
    "CAGECorrection",
    "cage_correction_of",
    "cage_lambda",
    "cage_param_groups",
    "check_cage_hyperparameters",
    "create_cage_optimizer",
    "decay_parameter_names",
    "weight_quantizers_of",
]

"""CAGE optimizer (AdamW + correction), the optimizer-agnostic correction wrapper, lambda schedules, factory."""

from .cage import CAGE
from .correction import CAGECorrection, weight_quantizers_of
from .factory import cage_param_groups, create_cage_optimizer
from .schedule import SCHEDULES, VARIANTS, cage_lambda, check_cage_hyperparameters

__all__ = [
    "CAGE",
    "SCHEDULES",
    "VARIANTS",
    "CAGECorrection",
    "cage_lambda",
    "cage_param_groups",
    "check_cage_hyperparameters",
    "create_cage_optimizer",
    "weight_quantizers_of",
]

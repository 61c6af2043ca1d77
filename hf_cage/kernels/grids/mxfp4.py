"""``mxfp4``: E2M1 values times a power-of-two (E8M0) scale per group of 32 inputs (compressed-tensors' MXFP4)."""

from __future__ import annotations

from .. import fp4
from ..grid import register_grid
from ._e2m1 import E2M1Grid


class Mxfp4Grid(E2M1Grid):
    name = "mxfp4"
    description = "E2M1, E8M0 scale per 32 inputs"
    fixed_group_size = fp4.GROUP_SIZE["mxfp4"]
    card_name = "MXFP4 (E2M1 values, power-of-two E8M0 scale per group)"
    card_activation_rule = "a power-of-two (E8M0) scale per token and group of 32, computed on every forward"


register_grid(Mxfp4Grid())

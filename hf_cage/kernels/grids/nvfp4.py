"""``nvfp4``: E2M1 values times an FP8 E4M3 scale per group of 16 inputs times an fp32 global scale per tensor.

Activations use a per-layer global scale calibrated during training (``input_global_scale``), the static scale
compressed-tensors' NVFP4 preset reads from the checkpoint.
"""

from __future__ import annotations

import torch

from .. import fp4
from ..grid import register_grid
from ._e2m1 import E2M1Grid


class Nvfp4Grid(E2M1Grid):
    name = "nvfp4"
    description = "E2M1, E4M3 scale per 16 inputs times a global scale"
    fixed_group_size = fp4.GROUP_SIZE["nvfp4"]
    scale_dtype = torch.float8_e4m3fn
    global_scale = True
    input_global_scale = True
    card_name = "NVFP4 (E2M1 values, E4M3 scale per group times an fp32 global scale)"
    card_activation_rule = (
        "an FP8 E4M3 scale per token and group of 16, computed on every forward, times the layer's "
        "`input_global_scale` (calibrated during training as the running input maximum, stored here)"
    )

    def observed_input_scale(self, x, spec):
        return fp4.tensor_global_scale(x.detach(), spec.hadamard_block)


register_grid(Nvfp4Grid())

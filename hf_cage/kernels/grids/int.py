"""``int``: the integer grid ``[-2^(b-1), 2^(b-1) - 1] * step`` of standard int checkpoint formats."""

from __future__ import annotations

from ..grid import register_grid
from ._uniform import UniformGrid


class IntGrid(UniformGrid):
    name = "int"
    legacy_name = "integer"
    description = "integer grid, exportable to int4 formats"
    # The rule stock loaders (compressed-tensors, vLLM) apply to activations, so what is trained is what is served.
    default_activation_clip = "minmax"
    card_name = "integer"
    card_grid = "integer"
    card_converted_name = "int"

    def card_stored(self):
        return "hf-cage's integer grid", "no rotation is applied"


register_grid(IntGrid())

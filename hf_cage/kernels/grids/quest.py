"""``quest``: QuEST's mid-rise grid, ``2^b`` levels at ``(code + 1/2) * step``, no zero level
(docs/method.md#the-papers-quantizer-quest)."""

from __future__ import annotations

from ..grid import register_grid
from ._uniform import UniformGrid


class QuestGrid(UniformGrid):
    name = "quest"
    legacy_name = "midrise"
    description = "mid-rise grid, scale alpha_b * RMS, Hadamard by default"
    code_offset = 0.5
    default_activation_clip = "mse"
    default_hadamard = True
    card_name = "mid-rise (QuEST)"
    card_grid = "mid-rise"

    def card_stored(self):
        return "the QuEST mid-rise grid", "compressed-tensors has no mid-rise grid"


register_grid(QuestGrid())

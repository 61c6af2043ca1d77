"""``hf-cage``: the packed tensors plus hf-cage's own metadata, for any 4-bit grid hf-cage trains.

It writes no ``quantization_config``: only :func:`hf_cage.load_quantized` reads it, and it reproduces the trained
model, activation rule and Hadamard rotation included (what the stock formats cannot express).
"""

from __future__ import annotations

from .base import ExportFormat
from .fp4 import input_global_scale


class HfCageFormat(ExportFormat):
    name = "hf-cage"
    label = "`hf-cage` (read by `hf_cage.load_quantized`)"
    library_name = "hf-cage"
    summary = "any 4-bit hf-cage grid (QuEST, Hadamard, any activation rule); loads with hf_cage.load_quantized"
    weight_bits = (4,)

    def problem(self, config, *, weights_only=False):
        if weights_only:
            return (
                "--weights-only is a compressed-tensors declaration; the hf-cage format always keeps the trained "
                "activation rule (hf_cage.load_quantized applies it)"
            )
        if config.w_bits not in self.weight_bits:
            return (
                f"--format hf-cage holds 4-bit weights (hf_cage.Int4Linear), the model has w_bits={config.w_bits}; "
                "for 2-, 3- or 8-bit int weights use --format compressed-tensors"
            )
        return None

    def card_notes(self, trained, conversion, *, weights_only):
        grid, why = trained.quant_grid.card_stored()
        rotation = " with Hadamard rotations" if trained.hadamard else ""
        return [
            f"**Format.** This export stores {grid}{rotation} as trained; only `hf_cage.load_quantized` loads it "
            "(stock transformers and vLLM cannot: transformers applies no `transform_config` at load, so "
            f"{why}). `load_quantized` reproduces the trained forward, activation quantization included."
        ]

    def layer_tensors(self, name, layer, config, *, weights_only):
        return input_global_scale(name, layer, config)

    def usage(self, repo_id):
        return ""

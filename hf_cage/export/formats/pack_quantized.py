"""``compressed-tensors`` (``pack-quantized``): the ``int`` quantizer's integer grid for stock loaders.

It holds ``code * scale`` without rotation, 2, 3, 4 or 8 bits, per channel or per group, and may declare dynamic
per-token int activations, which the loader quantizes with compressed-tensors' own rule (hf-cage's
``a_clip="minmax"``). Any other grid, rotation or activation rule is served differently from how it was trained,
so it is a lossy :class:`~hf_cage.export.formats.base.Conversion`.
"""

from __future__ import annotations

from dataclasses import replace

from ...kernels.spec import QuantSpec
from .base import Conversion
from .compressed import HADAMARD_CONVERSION, HADAMARD_NOTE, StockFormat

VLLM_NOTE = (
    "vLLM picks a kernel from the declared scheme and the GPU. For int4 weights with dynamic int4 activations it "
    "runs real INT4 activations only on SM80-SM89 (Ampere, Ada); on Hopper it falls back to higher-precision "
    "activations, so the served numbers differ from the trained ones there. Weight-only int4 (W4A16) runs on its "
    "Marlin/Machete kernels."
)
SUB4_VLLM_NOTE = (
    "vLLM's compressed-tensors kernels take 4- and 8-bit integer weights and 4- and 8-bit activations; this "
    "export's widths are read by transformers (with compressed-tensors), which unpacks them at load."
)


class CompressedTensorsFormat(StockFormat):
    name = "compressed-tensors"
    label = "`compressed-tensors` (`pack-quantized`)"
    quantization_format = "pack-quantized"
    dtype_note = "compute in float32 to reproduce the trained numbers"
    summary = "pack-quantized; loads in stock transformers (with compressed-tensors) and vLLM"
    weight_bits = (2, 3, 4, 8)  # 2 and 3 bits packed densely (compressed-tensors' pack_to_int32)
    # compressed-tensors' dynamic per-token rule is the same for any width (scale = absmax / ((2^b - 1) / 2));
    # vLLM's kernels take 4- and 8-bit activations only.
    activation_bits = (2, 3, 4, 8)
    stored_grid = "int"  # the grid pack-quantized holds as trained; another grid is converted to it (lossy)

    @classmethod
    def loader_activation_spec(cls, bits: int) -> QuantSpec:
        """What compressed-tensors applies to declared dynamic per-token int activations at load."""
        return QuantSpec(bits, cls.stored_grid, "minmax", None, None)

    def problem(self, config, *, weights_only=False):
        home = config.quant_grid.stock_format
        if home != self.name:
            return (
                f"--format compressed-tensors (pack-quantized) holds integer grids; the {config.quantizer} grid is "
                f"exported with --format {home or 'hf-cage'} (or auto)"
            )
        if config.w_bits not in self.weight_bits:
            return (
                f"w_bits={config.w_bits} cannot be exported: --format compressed-tensors holds "
                f"{' or '.join(map(str, self.weight_bits))}-bit weights"
            )
        if self.declares_activations(config, weights_only) and config.a_bits not in self.activation_bits:
            bits = ", ".join(map(str, self.activation_bits))
            return (
                f"a_bits={config.a_bits}: hf-cage declares {bits}-bit dynamic activations in compressed-tensors; "
                "pass --weights-only to export the weights alone, or use --format hf-cage"
            )
        return None

    def conversion(self, config, *, weights_only=False):
        weights = None
        if config.quantizer != self.stored_grid or config.hadamard:
            what = []
            if config.quantizer != self.stored_grid:
                what.append(config.quant_grid.card_stored()[0])
            if config.hadamard:
                what.append(HADAMARD_CONVERSION)
            weights = f"compressed-tensors cannot hold {' and '.join(what)}"
        activations = None
        if self.declares_activations(config, weights_only):
            # Compare with an input width no rotation applies to: only the rule itself matters here.
            trained = replace(config, hadamard=False).activation_spec(8)
            if trained != self.loader_activation_spec(config.a_bits) or config.hadamard:
                activations = (
                    f"activations trained with quantizer={config.quantizer!r}, a_clip={config.a_clip!r}"
                    f"{', Hadamard' if config.hadamard else ''} are served with compressed-tensors' dynamic "
                    "per-token rule (a_clip='minmax' on the int grid)"
                )
        notes = []
        if config.a_bits is not None and weights_only:
            notes.append(f"activations are served unquantized (W{config.w_bits}A16), trained at {config.a_bits} bits")
        return Conversion(weights=weights, activations=activations, notes=notes)

    def converted_config(self, config, conversion):
        if conversion.weights:
            config = replace(config, quantizer=self.stored_grid, hadamard=False, clip="absmax")
        if conversion.activations or conversion.weights:
            config = replace(config, a_clip="minmax")
        return config

    def served_activation_spec(self, config, in_features, *, weights_only):
        if not self.declares_activations(config, weights_only):
            return None
        return self.loader_activation_spec(config.a_bits)

    def quantization_config(self, config, ignore, *, weights_only):
        weights = {
            "num_bits": config.w_bits,
            "type": "int",
            "symmetric": True,
            "strategy": config.granularity,
            "group_size": config.group_size if config.granularity == "group" else None,
            "dynamic": False,
        }
        activations = None
        if self.declares_activations(config, weights_only):
            activations = {
                "num_bits": config.a_bits,
                "type": "int",
                "symmetric": True,
                "strategy": "token",
                "group_size": None,
                "dynamic": True,
            }
        group = {
            "targets": ["Linear"],
            "weights": weights,
            "input_activations": activations,
            "output_activations": None,
            "format": self.quantization_format,
        }
        return self.compressed_tensors_config(group, ignore)

    def card_notes(self, trained, conversion, *, weights_only):
        notes = []
        a_bits = trained.a_bits
        if a_bits is not None and weights_only:
            notes.append(
                f"**Activations.** The model was trained with {a_bits}-bit activations; this export declares "
                f"weights only, so transformers and vLLM run it as W{trained.w_bits}A16. `hf_cage.load_quantized` "
                "restores the trained activation quantization."
            )
        elif a_bits is not None and conversion.activations:
            notes.append(
                f"**Activations.** transformers and vLLM quantize activations to {a_bits} bits with "
                "compressed-tensors' dynamic per-token rule (`scale = absmax / ((2^b - 1) / 2)`), which is not "
                f"the rule this model was trained with ({conversion.activations}); the measured difference is "
                "below."
            )
        elif a_bits is not None:
            notes.append(
                f"**Activations.** transformers and vLLM quantize activations to {a_bits} bits with "
                "compressed-tensors' dynamic per-token rule (`scale = absmax / ((2^b - 1) / 2)`, round, clamp to "
                f"`[-{2 ** (a_bits - 1)}, {2 ** (a_bits - 1) - 1}]`): the rule this model was trained with "
                '(`a_clip="minmax"`), so the served model computes what was trained.'
            )
        if trained.hadamard:
            notes.append(HADAMARD_NOTE)
        if trained.w_bits not in (4, 8) or (a_bits is not None and not weights_only and a_bits not in (4, 8)):
            notes.append(f"**vLLM.** {SUB4_VLLM_NOTE}")
        elif a_bits is not None and not weights_only:
            notes.append(f"**vLLM.** {VLLM_NOTE}")
        return notes

"""compressed-tensors' FP4 formats, ``mxfp4-pack-quantized`` and ``nvfp4-pack-quantized``: one object per grid.

Each holds the grid of the quantizer of the same name without rotation, weights packed two E2M1 codes per byte
with their group scales. The ``quantization_config`` is compressed-tensors' own preset (``MXFP4`` / ``NVFP4``, or
``MXFP4A16`` / ``NVFP4A16`` weights only), so the loader applies exactly the trained activation rule. Stock
transformers decompresses the weights into bfloat16 and computes in it (``compute_dtype``), so the served model is
the trained one computed in bfloat16.
"""

from __future__ import annotations

from dataclasses import replace

from ...kernels.grid import get_grid
from ...quant.config import QuantConfig
from ..errors import ExportError
from .base import Conversion
from .compressed import HADAMARD_CONVERSION, HADAMARD_NOTE, StockFormat

FP4_SERVING_NOTE = (
    "NVIDIA Blackwell GPUs have FP4 tensor cores that take MXFP4 and NVFP4 natively. On older GPUs vLLM serves "
    "these checkpoints as weight-only FP4 through its Marlin kernels: the weights are the trained ones, but "
    "activations are not quantized, so the served numbers differ from the trained ones."
)


class Fp4CompressedTensorsFormat(StockFormat):
    """``{grid}-pack-quantized`` for ``grid`` in ``mxfp4`` / ``nvfp4``."""

    compute_dtype = "bfloat16"
    dtype_note = "FP4 weights are decompressed to bfloat16"

    def __init__(self, grid: str):
        self.grid = grid
        self.name = self.quantization_format = f"{grid}-pack-quantized"
        self.label = f"`compressed-tensors` (`{self.name}`)"
        self.preset = grid.upper()
        self.summary = (
            f"the {grid} grid for stock transformers (bf16, with compressed-tensors) and vLLM (Blackwell natively)"
        )

    def problem(self, config, *, weights_only=False):
        if config.quantizer != self.grid:
            home = config.quant_grid.stock_format
            other = {None: "--format hf-cage", "compressed-tensors": "--format compressed-tensors or hf-cage"}.get(
                home, f"--format {home}"
            )
            return (
                f"--format {self.name} holds the {self.grid} grid; this model was trained with "
                f"quantizer={config.quantizer!r}: use {other} (or auto)"
            )
        return None

    def conversion(self, config, *, weights_only=False):
        weights = activations = None
        if config.hadamard:
            weights = HADAMARD_CONVERSION
            if self.declares_activations(config, weights_only):
                activations = "activations trained in the rotated basis are served unrotated"
        notes = ["stock transformers decompresses FP4 weights to bfloat16 and computes in bfloat16"]
        if config.a_bits is not None and weights_only:
            notes.append(f"activations are served unquantized (W4A16), trained at {config.a_bits} bits")
        return Conversion(weights=weights, activations=activations, notes=notes)

    def converted_config(self, config, conversion):
        return replace(config, hadamard=False) if conversion.weights else config

    def served_activation_spec(self, config, in_features, *, weights_only):
        return config.activation_spec(in_features) if self.declares_activations(config, weights_only) else None

    def layer_tensors(self, name, layer, config, *, weights_only):
        if not self.declares_activations(config, weights_only):
            return {}
        return input_global_scale(name, layer, config)

    def quantization_config(self, config, ignore, *, weights_only):
        """compressed-tensors' own preset for the grid, in compressed-tensors' envelope."""
        from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

        preset = self.preset if self.declares_activations(config, weights_only) else f"{self.preset}A16"
        scheme = preset_name_to_scheme(preset, ["Linear"])
        scheme.format = self.quantization_format
        return self.compressed_tensors_config(scheme.model_dump(mode="json"), ignore)

    def card_notes(self, trained, conversion, *, weights_only):
        notes = [
            "**Compute dtype.** transformers (with compressed-tensors) decompresses FP4 weights into bfloat16 at "
            "load: load with `dtype=torch.bfloat16` (float32 fails at the first forward). The served model is the "
            "trained one computed in bfloat16, hence the difference measured above (in bfloat16)."
        ]
        a_bits = trained.a_bits
        if a_bits is not None and weights_only:
            notes.append(
                f"**Activations.** The model was trained with {a_bits}-bit {self.grid.upper()} activations; this "
                "export declares weights only, so transformers and vLLM run it with unquantized activations."
            )
        elif a_bits is not None:
            notes.append(
                f"**Activations.** The loaders quantize each linear's input to FP4 (E2M1) with "
                f"{get_grid(self.grid).card_activation_rule}: the rule this model was trained with."
            )
        if trained.hadamard:
            notes.append(HADAMARD_NOTE)
        notes.append(f"**Serving.** {FP4_SERVING_NOTE}")
        return notes


def input_global_scale(name: str, layer, config: QuantConfig) -> dict:
    """``{"input_global_scale": ...}`` of an NVFP4 W4A4 layer (``{}`` for any other layer).

    Raises:
        ExportError: the layer's scale was never calibrated (it is set by the first forward pass).
    """
    scale = getattr(layer, "input_global_scale", None)
    if scale is None or config.a_bits is None:
        return {}
    if not bool((scale > 0).all()):
        raise ExportError(
            f"{name}: input_global_scale was never calibrated (the NVFP4 activation scale is set by the first "
            "forward pass); run the model on some data (training does) before exporting"
        )
    return {"input_global_scale": scale.detach().float().reshape(1)}

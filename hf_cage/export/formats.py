"""The export formats: one object per format owns its checks, its config, its card notes and its loader.

- ``compressed-tensors`` (``pack-quantized``): what stock transformers and vLLM load. It stores the
  ``int`` quantizer's integer grid (``code * scale``) without rotation, 2, 3, 4 or 8 bits, per channel or per
  group, and may declare dynamic per-token activations (2, 3, 4 or 8 bits), which the loader then quantizes with
  compressed-tensors' own rule (``scale = absmax / ((2^b - 1) / 2)``, round, clamp): hf-cage's
  ``a_clip="minmax"``. Anything else (QuEST mid-rise grid, Hadamard rotation, another activation rule)
  is served differently from how it was trained, so it is exported only with ``allow_lossy`` and a
  printed, measured difference.
- ``hf-cage``: the same tensors plus hf-cage's own metadata, for any 4-bit grid hf-cage trains;
  :func:`hf_cage.load_quantized` reproduces the trained model (activation rule and rotation included).
  Stock loaders cannot apply its grids: transformers 5.24's compressed-tensors quantizer applies
  ``quantization_config`` only, never a ``transform_config`` (no Hadamard at load).
- ``mxfp4-pack-quantized`` / ``nvfp4-pack-quantized`` (compressed-tensors' FP4 formats, one object each):
  the ``mxfp4`` / ``nvfp4`` quantizers' grids without rotation, weights packed two E2M1 codes per byte
  with their group scales, activations declared as compressed-tensors' presets ``MXFP4`` / ``NVFP4``
  (``MXFP4A16`` / ``NVFP4A16`` with ``weights_only``). Stock transformers decompresses the weights to
  bf16 at load and computes in bf16 (float32 fails), so the served model is the trained one computed in
  bf16: parity is measured in bf16 and is not exact against the float32-trained model.
- ``auto`` (:func:`choose_format`): the compressed-tensors format of the model's grid when it serves the
  model as trained, else hf-cage.

All keep the model's :class:`~hf_cage.QuantConfig` under ``hf_cage_quantization`` (the grid actually
stored) and describe the export under :data:`EXPORT_KEY`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..kernels.spec import FP4_GRIDS, QuantSpec
from ..qat import EXPORT_KEY  # noqa: F401  (its home is hf_cage.qat, beside CONFIG_KEY; importable from here too)
from ..quant.config import QuantConfig
from .errors import ExportError

FORMAT_VERSION = 2
PACKING = "pack-quantized: code + 2^(bits-1), 32/bits codes per int32 along inputs, lowest bits first"
FP4_PACKING = "fp4: E2M1 codes (sign bit 3), two per uint8 along inputs, even input in the low nibble"
VLLM_NOTE = (
    "Not tested here (no GPU was available). vLLM picks a kernel from the declared scheme and the GPU. "
    "For int4 weights with dynamic int4 activations it runs real INT4 activations only on SM80-SM89 (Ampere, "
    "Ada); on Hopper it falls back to higher-precision activations, so the served numbers differ from the "
    "trained ones there. Weight-only int4 (W4A16) runs on its Marlin/Machete kernels."
)
SUB4_VLLM_NOTE = (
    "vLLM's compressed-tensors kernels take 4- and 8-bit integer weights and 4- and 8-bit activations; this "
    "export's widths are read by transformers (with compressed-tensors), which unpacks them at load."
)
FP4_SERVING_NOTE = (
    "Not tested here (no GPU was available). NVIDIA Blackwell GPUs have FP4 tensor cores that take MXFP4 and "
    "NVFP4 natively. On older GPUs vLLM serves these checkpoints as weight-only FP4 through its Marlin kernels "
    "(its log says the GPU lacks native FP4 support and weight-only FP4 compression is used): the weights are "
    "the trained ones, but activations are not quantized, so the served numbers differ from the trained ones."
)


@dataclass
class Conversion:
    """What changes between the trained model and the model a format's loader serves, and why."""

    weights: str | None = None  # why the weights are re-quantized (None: stored exactly)
    activations: str | None = None  # why served activations differ (None: as trained, or not declared)
    notes: list[str] = field(default_factory=list)

    @property
    def lossy(self) -> bool:
        return bool(self.weights or self.activations)


class ExportFormat:
    """Base class: a format knows what it can hold, what it writes, what the card says and how to load it."""

    name = ""
    label = ""  # how the card names the format
    library_name = ""
    summary = ""
    compute_dtype: str | None = None  # dtype the format's loader computes in (None: the checkpoint's)

    def problem(self, config: QuantConfig, *, weights_only: bool = False) -> str | None:
        """Why this format cannot hold the model at all (one clause), or ``None``."""
        raise NotImplementedError

    def conversion(self, config: QuantConfig, *, weights_only: bool = False) -> Conversion:
        """What the format's loader serves differently from the trained model."""
        return Conversion()

    def check(self, config: QuantConfig, *, weights_only: bool = False, allow_lossy: bool = False) -> Conversion:
        """Raise :class:`ExportError` if the model cannot be exported as asked; returns the :class:`Conversion`."""
        problem = self.problem(config, weights_only=weights_only)
        if problem:
            raise ExportError(problem)
        conversion = self.conversion(config, weights_only=weights_only)
        if conversion.lossy and not allow_lossy:
            why = "; ".join(w for w in (conversion.weights, conversion.activations) if w)
            raise ExportError(
                f"--format {self.name} would not serve the model as trained: {why}; use --format hf-cage "
                "(or auto) for an exact export, or --allow-lossy to convert and print the measured difference"
            )
        return conversion

    def exported_config(self, config: QuantConfig, conversion: Conversion, *, weights_only: bool) -> QuantConfig:
        """The :class:`QuantConfig` of what is stored: the trained one unless converted, with no activation bits
        under ``weights_only`` (what the loaders serve, so :func:`hf_cage.load_quantized` serves it too)."""
        config = self.converted_config(config, conversion)
        return replace(config, a_bits=None) if weights_only else config

    def converted_config(self, config: QuantConfig, conversion: Conversion) -> QuantConfig:
        """The trained :class:`QuantConfig` with the grid the format actually stores."""
        return config

    def served_activation_spec(self, config: QuantConfig, in_features: int, *, weights_only: bool) -> QuantSpec | None:
        """The activation grid the format's loader applies to a linear's inputs (``config``: exported)."""
        return config.activation_spec(in_features)

    def served_a_bits(self, config: QuantConfig, *, weights_only: bool) -> int | None:
        """Activation bits the format's loader applies (``None``: activations served unquantized)."""
        return config.a_bits

    def layer_tensors(self, name: str, layer, config: QuantConfig, *, weights_only: bool) -> dict:
        """Tensors of a quantized layer the loader needs besides its packed weight (``config``: exported)."""
        return {}

    def hf_cage_usage(self, repo_id: str, config: QuantConfig) -> str:
        """Markdown: loading the export with :func:`hf_cage.load_quantized` (4-bit weights only)."""
        if config.w_bits != 4:
            return ""
        what = f", {config.a_bits}-bit activations as stored in the export's config" if config.a_bits else ""
        layer = "Fp4Linear" if config.quantizer in FP4_GRIDS else "Int4Linear"
        return (
            f"With hf-cage (packed `{layer}` layers{what}):\n\n```python\nimport hf_cage\n"
            "from huggingface_hub import snapshot_download\n\n"
            f'model = hf_cage.load_quantized(snapshot_download("{repo_id}"))\n```\n'
        )

    def quantization_config(self, config: QuantConfig, ignore: list[str], *, weights_only: bool) -> dict | None:
        """The ``quantization_config`` entry of ``config.json`` (``None``: none is written)."""
        return None

    def card_notes(self, trained: QuantConfig, conversion: Conversion, *, weights_only: bool) -> list[str]:
        """Paragraphs the model card prints about how this export is served."""
        return []

    def usage(self, repo_id: str) -> str:
        """Markdown: how to load the export (the card's Usage section)."""
        raise NotImplementedError

    def load(self, path, **kwargs):
        """Load an export of this format with its loader."""
        raise NotImplementedError


class StockFormat(ExportFormat):
    """A format stock transformers (with compressed-tensors) and vLLM load: one usage text and one loader,
    in the dtype the loader computes in (``compute_dtype``, float32 when the checkpoint's own)."""

    library_name = "transformers"
    quantization_format = ""  # the ``format`` its ``quantization_config`` declares
    dtype_note = ""  # why the usage loads in that dtype

    @property
    def load_dtype(self) -> str:
        return self.compute_dtype or "float32"

    def usage(self, repo_id):
        return (
            f"With transformers (needs `compressed-tensors`; {self.dtype_note}):\n\n"
            "```python\nimport torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype=torch.{self.load_dtype})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n```\n\n'
            "With vLLM:\n\n```python\nfrom vllm import LLM\n\n"
            f'llm = LLM("{repo_id}")\nprint(llm.generate("To be, or not to be")[0].outputs[0].text)\n```\n'
        )

    def load(self, path, **kwargs):
        import torch
        from transformers import AutoModelForCausalLM

        kwargs.setdefault("dtype", getattr(torch, self.load_dtype))
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)


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

    @staticmethod
    def declares_activations(config: QuantConfig, weights_only: bool) -> bool:
        return config.a_bits is not None and not weights_only

    @staticmethod
    def loader_activation_spec(bits: int) -> QuantSpec:
        """What compressed-tensors applies to declared dynamic per-token int activations at load."""
        return QuantSpec(bits, "integer", "minmax", None, None)

    def problem(self, config, *, weights_only=False):
        if config.quantizer in FP4_GRIDS:
            return (
                f"--format compressed-tensors (pack-quantized) holds integer grids; the {config.quantizer} grid is "
                f"exported with --format {config.quantizer}-pack-quantized (or auto)"
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
        if config.quantizer != "int" or config.hadamard:
            what = []
            if config.quantizer == "quest":
                what.append("the QuEST mid-rise grid")
            if config.hadamard:
                what.append("a Hadamard rotation (stock loaders apply no transform_config)")
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
            config = replace(config, quantizer="int", hadamard=False, clip="absmax")
        if conversion.activations or conversion.weights:
            config = replace(config, a_clip="minmax")
        return config

    def served_activation_spec(self, config, in_features, *, weights_only):
        if not self.declares_activations(config, weights_only):
            return None
        return self.loader_activation_spec(config.a_bits)

    def served_a_bits(self, config, *, weights_only):
        return config.a_bits if self.declares_activations(config, weights_only) else None

    def quantization_config(self, config, ignore, *, weights_only):
        """``quantization_config`` of a ``pack-quantized`` checkpoint, as ``compressed-tensors`` writes it."""
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
        return {
            "quant_method": "compressed-tensors",
            "format": self.quantization_format,
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": activations,
                    "output_activations": None,
                    "format": self.quantization_format,
                }
            },
            "ignore": sorted(ignore),
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
            "version": _compressed_tensors_version(),
        }

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
            notes.append(
                "**Hadamard.** The model was trained with Hadamard rotations; stock transformers (5.24) and this "
                "format apply none at load (no `transform_config`), so the weights were re-quantized without it."
            )
        if trained.w_bits not in (4, 8) or (a_bits is not None and not weights_only and a_bits not in (4, 8)):
            notes.append(f"**vLLM.** {SUB4_VLLM_NOTE}")
        elif a_bits is not None and not weights_only:
            notes.append(f"**vLLM.** {VLLM_NOTE}")
        return notes


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
        grid = {"quest": "the QuEST mid-rise grid", "int": "hf-cage's integer grid"}.get(
            trained.quantizer, f"the {trained.quantizer.upper()} grid"
        )
        rotation = " with Hadamard rotations" if trained.hadamard else ""
        why = "compressed-tensors has no mid-rise grid" if trained.quantizer == "quest" else "no rotation is applied"
        return [
            f"**Format.** This export stores {grid}{rotation} as trained; only `hf_cage.load_quantized` loads it "
            "(stock transformers and vLLM cannot: transformers 5.24 applies no `transform_config` at load, so "
            f"{why}). `load_quantized` reproduces the trained forward, activation quantization included."
        ]

    def layer_tensors(self, name, layer, config, *, weights_only):
        return _input_global_scale(name, layer, config)

    def usage(self, repo_id):
        return ""

    def load(self, path, **kwargs):
        from .load import load_quantized

        return load_quantized(path, **kwargs)


class Fp4CompressedTensorsFormat(StockFormat):
    """compressed-tensors' ``mxfp4-pack-quantized`` or ``nvfp4-pack-quantized``: one object per FP4 grid.

    Holds the grid of the quantizer of the same name without rotation. The ``quantization_config`` is
    compressed-tensors' own preset (``MXFP4`` / ``NVFP4``, or ``MXFP4A16`` / ``NVFP4A16`` weights only),
    so the loader applies exactly the trained activation rule: MXFP4 dynamic E8M0 scales per token and
    group of 32; NVFP4 dynamic E4M3 scales per token and group of 16 times the layer's calibrated
    ``input_global_scale``, which is stored. transformers decompresses the weights into bf16 and must
    compute in bf16 (``compute_dtype``): the parity measurement runs the served model in bf16.
    """

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

    @staticmethod
    def declares_activations(config: QuantConfig, weights_only: bool) -> bool:
        return config.a_bits is not None and not weights_only

    def problem(self, config, *, weights_only=False):
        if config.quantizer != self.grid:
            other = (
                f"--format {config.quantizer}-pack-quantized"
                if config.quantizer in FP4_GRIDS
                else "--format compressed-tensors or hf-cage"
            )
            return (
                f"--format {self.name} holds the {self.grid} grid; this model was trained with "
                f"quantizer={config.quantizer!r}: use {other} (or auto)"
            )
        return None

    def conversion(self, config, *, weights_only=False):
        weights = activations = None
        if config.hadamard:
            weights = "a Hadamard rotation (stock loaders apply no transform_config)"
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

    def served_a_bits(self, config, *, weights_only):
        return config.a_bits if self.declares_activations(config, weights_only) else None

    def layer_tensors(self, name, layer, config, *, weights_only):
        if not self.declares_activations(config, weights_only):
            return {}
        return _input_global_scale(name, layer, config)

    def quantization_config(self, config, ignore, *, weights_only):
        """compressed-tensors' own preset for the grid, written as compressed-tensors writes a config."""
        from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

        preset = self.preset if self.declares_activations(config, weights_only) else f"{self.preset}A16"
        scheme = preset_name_to_scheme(preset, ["Linear"])
        scheme.format = self.quantization_format
        return {
            "quant_method": "compressed-tensors",
            "format": self.quantization_format,
            "quantization_status": "compressed",
            "config_groups": {"group_0": scheme.model_dump(mode="json")},
            "ignore": sorted(ignore),
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
            "version": _compressed_tensors_version(),
        }

    def card_notes(self, trained, conversion, *, weights_only):
        notes = [
            "**Compute dtype.** transformers (5.24, with compressed-tensors 0.20) decompresses FP4 weights into "
            "bfloat16 at load: load with `dtype=torch.bfloat16` (float32 fails at the first forward). The served "
            "model is the trained one computed in bfloat16, hence the difference measured above (in bfloat16)."
        ]
        a_bits = trained.a_bits
        if a_bits is not None and weights_only:
            notes.append(
                f"**Activations.** The model was trained with {a_bits}-bit {self.grid.upper()} activations; this "
                "export declares weights only, so transformers and vLLM run it with unquantized activations."
            )
        elif a_bits is not None:
            rule = (
                "a power-of-two (E8M0) scale per token and group of 32, computed on every forward"
                if self.grid == "mxfp4"
                else "an FP8 E4M3 scale per token and group of 16, computed on every forward, times the layer's "
                "`input_global_scale` (calibrated during training as the running input maximum, stored here)"
            )
            notes.append(
                f"**Activations.** The loaders quantize each linear's input to FP4 (E2M1) with {rule}: the rule "
                "this model was trained with."
            )
        if trained.hadamard:
            notes.append(
                "**Hadamard.** The model was trained with Hadamard rotations; stock transformers (5.24) and this "
                "format apply none at load (no `transform_config`), so the weights were re-quantized without it."
            )
        notes.append(f"**Serving.** {FP4_SERVING_NOTE}")
        return notes


def _input_global_scale(name: str, layer, config: QuantConfig) -> dict:
    """``{"input_global_scale": ...}`` of an NVFP4 W4A4 layer; refuses one that was never calibrated."""
    scale = getattr(layer, "input_global_scale", None)
    if scale is None or config.a_bits is None:
        return {}
    if not bool((scale > 0).all()):
        raise ExportError(
            f"{name}: input_global_scale was never calibrated (the NVFP4 activation scale is set by the first "
            "forward pass); run the model on some data (training does) before exporting"
        )
    return {"input_global_scale": scale.detach().float().reshape(1)}


FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        CompressedTensorsFormat(),
        Fp4CompressedTensorsFormat("mxfp4"),
        Fp4CompressedTensorsFormat("nvfp4"),
        HfCageFormat(),
    )
}
FORMAT_CHOICES = ("auto", *FORMATS)


def stock_load_dtype(quantization_format: str | None) -> str:
    """The dtype stock transformers loads and computes a checkpoint in, from its ``quantization_config``'s
    ``format`` (``"bfloat16"`` for the FP4 formats, else ``"float32"``)."""
    for fmt in FORMATS.values():
        if isinstance(fmt, StockFormat) and fmt.quantization_format == quantization_format:
            return fmt.load_dtype
    return "float32"


def get_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise ExportError(f"unknown format {name!r}; choose one of {', '.join(FORMAT_CHOICES)}")
    return FORMATS[name]


def stock_format_for(config: QuantConfig) -> ExportFormat:
    """The compressed-tensors format of the model's grid: ``{mx,nv}fp4-pack-quantized`` or ``pack-quantized``."""
    if config.quantizer in FP4_GRIDS:
        return FORMATS[f"{config.quantizer}-pack-quantized"]
    return FORMATS["compressed-tensors"]


def choose_format(config: QuantConfig, *, weights_only: bool = False) -> tuple[ExportFormat, str | None]:
    """``auto``: the compressed-tensors format of the model's grid when it serves the model as trained, else
    hf-cage with the reason why.

    Raises :class:`ExportError` when neither format holds the model without loss.
    """
    ct, hf = stock_format_for(config), FORMATS["hf-cage"]
    why = ct.problem(config, weights_only=weights_only)
    convertible = why is None  # --allow-lossy can only convert what the stock format holds at all
    if convertible:
        conversion = ct.conversion(config, weights_only=weights_only)
        if not conversion.lossy:
            return ct, None
        why = "; ".join(w for w in (conversion.weights, conversion.activations) if w)
    if hf.problem(config, weights_only=weights_only) is None:
        return hf, (
            f"format auto: hf-cage, because {why}; load it with hf_cage.load_quantized(path) "
            f"(--format {ct.name} --allow-lossy converts it for stock loaders, with the difference printed)"
        )
    advice = (
        f"pass --format {ct.name} --allow-lossy to convert it and print the measured difference"
        if convertible
        else "no packed format holds it; the training checkpoint itself loads with hf_cage.load_qat_model(path)"
    )
    raise ExportError(
        f"no format serves this model as trained: {why}; {hf.problem(config, weights_only=weights_only)}; {advice}"
    )


def resolve_format(
    name: str, config: QuantConfig, *, weights_only: bool = False, allow_lossy: bool = False
) -> tuple[ExportFormat, Conversion, str | None]:
    """``(format, conversion, note)`` for ``--format name`` (``auto`` or a format name); raises ExportError."""
    note = None
    if name == "auto":
        fmt, note = choose_format(config, weights_only=weights_only)
    else:
        fmt = get_format(name)
    return fmt, fmt.check(config, weights_only=weights_only, allow_lossy=allow_lossy), note


def export_metadata(
    config: QuantConfig, fmt: ExportFormat, *, weights_only: bool, lossy_from: QuantConfig | None, parity: dict
) -> dict:
    """hf-cage's description of the export (stored under :data:`hf_cage.qat.EXPORT_KEY`)."""
    from .. import __version__

    spec = config.weight_spec(config.group_size or 128)
    data = {
        "format": fmt.name,
        "format_version": FORMAT_VERSION,
        "hf_cage_version": __version__,
        "weight_grid": spec.grid,
        "code_offset": spec.code_offset,
        "hadamard": bool(config.hadamard),
        "hadamard_max_block": 128 if config.hadamard else None,
        "packing": FP4_PACKING if config.quantizer in FP4_GRIDS else PACKING,
        "weights_only": weights_only,
        "parity": parity,
    }
    if lossy_from is not None:
        data["lossy_conversion_from"] = lossy_from.to_dict()
    return data


def _compressed_tensors_version() -> str:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:  # the version string is informative only
        return "unknown"

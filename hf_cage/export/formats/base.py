"""What every export format is: :class:`ExportFormat`, and the :class:`Conversion` it reports."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ...kernels.spec import QuantSpec
from ...quant.config import QuantConfig
from ..errors import ExportError


@dataclass
class Conversion:
    """What changes between the trained model and the model a format's loader serves, and why."""

    weights: str | None = None  # why the weights are re-quantized (None: stored exactly)
    activations: str | None = None  # why served activations differ (None: as trained, or not declared)
    notes: list[str] = field(default_factory=list)

    @property
    def lossy(self) -> bool:
        return bool(self.weights or self.activations)

    @property
    def why(self) -> str:
        """The reasons the served model differs, joined in one clause ("" when it does not)."""
        return "; ".join(w for w in (self.weights, self.activations) if w)


class ExportFormat:
    """Base class: a format knows what it can hold, what it writes and what the card says about serving it."""

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
        """The :class:`Conversion` of exporting ``config`` in this format.

        Raises:
            ExportError: the format cannot hold the model, or would serve it differently without ``allow_lossy``.
        """
        problem = self.problem(config, weights_only=weights_only)
        if problem:
            raise ExportError(problem)
        conversion = self.conversion(config, weights_only=weights_only)
        if conversion.lossy and not allow_lossy:
            raise ExportError(
                f"--format {self.name} would not serve the model as trained: {conversion.why}; use --format hf-cage "
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
        layer = config.quant_grid.packed_layer
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

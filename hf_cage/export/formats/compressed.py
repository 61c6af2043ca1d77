"""What the compressed-tensors formats share: :class:`StockFormat`.

A stock format is one stock transformers (with compressed-tensors) and vLLM load: its ``config.json`` carries a
``quantization_config`` in compressed-tensors' envelope, and its loader applies no ``transform_config``, so a
Hadamard rotation the model was trained with is not applied at load.
"""

from __future__ import annotations

from ...quant.config import QuantConfig
from .base import ExportFormat

HADAMARD_NOTE = (
    "**Hadamard.** The model was trained with Hadamard rotations; stock transformers applies none at load "
    "(this format has no `transform_config`), so the weights were re-quantized without it."
)
HADAMARD_CONVERSION = "a Hadamard rotation (stock loaders apply no transform_config)"


class StockFormat(ExportFormat):
    """A compressed-tensors format: one usage text, one ``quantization_config`` envelope, activations declared
    unless ``weights_only``, loaded in ``compute_dtype`` (float32 when the checkpoint's own)."""

    library_name = "transformers"
    quantization_format = ""  # the ``format`` its ``quantization_config`` declares
    dtype_note = ""  # why the usage loads in that dtype

    @property
    def load_dtype(self) -> str:
        return self.compute_dtype or "float32"

    @staticmethod
    def declares_activations(config: QuantConfig, weights_only: bool) -> bool:
        """Whether the ``quantization_config`` declares activation quantization (the loader then applies it)."""
        return config.a_bits is not None and not weights_only

    def served_a_bits(self, config, *, weights_only):
        return config.a_bits if self.declares_activations(config, weights_only) else None

    def compressed_tensors_config(self, config_group: dict, ignore: list[str]) -> dict:
        """``quantization_config`` of a compressed checkpoint holding ``config_group``, as compressed-tensors writes
        it (no sparsity, no transform)."""
        return {
            "quant_method": "compressed-tensors",
            "format": self.quantization_format,
            "quantization_status": "compressed",
            "config_groups": {"group_0": config_group},
            "ignore": sorted(ignore),
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
            "version": _compressed_tensors_version(),
        }

    def usage(self, repo_id):
        return (
            f"With transformers (needs `compressed-tensors`; {self.dtype_note}):\n\n"
            "```python\nimport torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype=torch.{self.load_dtype})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n```\n\n'
            "With vLLM:\n\n```python\nfrom vllm import LLM\n\n"
            f'llm = LLM("{repo_id}")\nprint(llm.generate("To be, or not to be")[0].outputs[0].text)\n```\n'
        )


def _compressed_tensors_version() -> str:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:  # the version string is informative only
        return "unknown"

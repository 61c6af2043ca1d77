"""peft LoRA adapters on packed ``Int4Linear`` layers (QLoRA-style fine-tuning of an exported 4-bit model).

``QATLinear`` needs nothing from here: it is an ``nn.Linear`` subclass, so peft's default LoRA
``Linear`` wraps it. ``Int4Linear`` holds packed int4 codes, not a ``weight``, so peft needs a custom
LoRA layer, registered on the ``LoraConfig`` through peft's custom-module API::

    config = register_int4_lora(LoraConfig(r=8, target_modules=[...]))
    model = get_peft_model(int4_model, config)      # base frozen, adapters train in full precision
    model.save_pretrained(out); PeftModel.from_pretrained(int4_base, out, config=...)  # round trip

The forward is peft's: ``Int4Linear(x) + B A x * alpha / r``. Merging folds ``B A * alpha / r`` into the
dequantized weight and re-quantizes it to int4 codes and scales (the result is a plain ``Int4Linear``
again), which is lossy, so merged adapters cannot be unmerged. Importing this module imports peft.
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

from .layers.int4_linear import Int4Linear
from .layers.packed import pack_weight


class Int4LoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` around an :class:`~hf_cage.Int4Linear`; merging re-quantizes into the packed codes."""

    def __init__(self, base_layer, adapter_name: str, **kwargs):
        # peft finds a quantized layer's device through ``qweight`` (the GPTQ name for a packed weight).
        int4 = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if not hasattr(int4, "qweight"):
            int4.qweight = int4.weight_packed
        super().__init__(base_layer, adapter_name, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        weight = base.dequantized_weight(torch.float32)
        for name in adapter_names:
            if name in self.lora_A:
                weight = weight + self.get_delta_weight(name).to(torch.float32)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs or infs in the merged weight of adapters {adapter_names}; not merging them")
        base.load_packed(pack_weight(weight, base.weight_spec))
        self.merged_adapters.extend(name for name in adapter_names if name in self.lora_A)

    def unmerge(self) -> None:
        if self.merged:
            raise NotImplementedError(
                "adapters merged into an Int4Linear were re-quantized and cannot be unmerged; "
                "reload the base model and the saved adapters instead"
            )


def register_int4_lora(config: LoraConfig) -> LoraConfig:
    """Teach ``config`` to wrap :class:`~hf_cage.Int4Linear` layers with :class:`Int4LoraLinear`; returns it."""
    config._register_custom_module({Int4Linear: Int4LoraLinear})
    return config

"""``QuantConfig``: what to quantize in a model, and on which grid."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..kernels.spec import SCALE_RULES, SUPPORTED_BITS, QuantSpec
from ..kernels.tiles import largest_pow2_divisor

QUANTIZERS = ("quest", "int")
GRANULARITIES = ("channel", "group")
GROUP_SIZES = (32, 64, 128)
HADAMARD_MAX_BLOCK = 128
ACTIVATION_CLIPS = ("minmax", "mse", "absmax")
# Activation scale rule by quantizer when ``a_clip`` is not given: ``int`` models get the rule stock loaders
# (compressed-tensors, vLLM) apply to activations, so what is trained is what is served.
DEFAULT_ACTIVATION_CLIP = {"int": "minmax", "quest": "mse"}

# The seven linears of every Llama block (attention q/k/v/o, SwiGLU gate/up/down), as data.
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_SKIP_MODULES = ("lm_head", "embed_tokens")


@dataclass
class QuantConfig:
    """Which linears to quantize and how.

    Args:
        w_bits: weight bits, one of 2, 3, 4, 8.
        a_bits: input-activation bits (2, 3, 4, 8) or ``None`` for weight-only quantization.
        quantizer: ``"quest"`` (mid-rise grid, scale ``alpha_b * RMS``, CAGE.md section 4) or
            ``"int"`` (integer grid ``[-2^(b-1), 2^(b-1)-1] * scale``, exportable to int4 formats).
        granularity: ``"channel"`` (one weight scale per output row) or ``"group"``.
        group_size: inputs per weight scale when ``granularity="group"`` (32, 64, 128; default 128).
        hadamard: rotate inputs in blocks of up to 128 before quantizing (weights and activations
            alike). Default: True for ``quest``, False for ``int``.
        clip: weight scale rule, ``"mse"`` (Gaussian-MSE-optimal clip ``alpha_b * RMS``), ``"absmax"`` or
            ``"minmax"`` (see ``a_clip``).
        a_clip: activation scale rule (activations always use one scale per token): ``"minmax"``
            (compressed-tensors' dynamic per-token rule, ``scale = absmax / ((2^b - 1) / 2)``, bit for bit
            what stock transformers and vLLM apply at load), ``"mse"`` or ``"absmax"``. Default:
            ``"minmax"`` for ``int``, ``"mse"`` for ``quest``.
        target_modules: module names (last path component) to quantize.
        skip_modules: names never quantized, even if listed as targets.
    """

    w_bits: int = 4
    a_bits: int | None = 4
    quantizer: str = "quest"
    granularity: str = "channel"
    group_size: int | None = None
    hadamard: bool | None = None
    clip: str = "mse"
    a_clip: str | None = None
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGET_MODULES))
    skip_modules: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP_MODULES))

    def __post_init__(self):
        _check_choice("w_bits", self.w_bits, SUPPORTED_BITS)
        _check_choice("a_bits", self.a_bits, (*SUPPORTED_BITS, None))
        _check_choice("quantizer", self.quantizer, QUANTIZERS)
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("clip", self.clip, SCALE_RULES)
        if self.a_clip is None:
            self.a_clip = DEFAULT_ACTIVATION_CLIP[self.quantizer]
        _check_choice("a_clip", self.a_clip, ACTIVATION_CLIPS)
        if self.granularity == "group":
            if self.group_size is None:
                self.group_size = 128
            _check_choice("group_size", self.group_size, GROUP_SIZES)
        elif self.group_size is not None:
            raise ValueError(f"group_size={self.group_size} needs granularity='group' (got {self.granularity!r})")
        if self.hadamard is None:
            self.hadamard = self.quantizer == "quest"
        self.target_modules = list(self.target_modules)
        self.skip_modules = list(self.skip_modules)
        if not self.target_modules:
            raise ValueError("target_modules is empty; name at least one module, e.g. ['q_proj', 'v_proj']")

    @property
    def grid(self) -> str:
        return "midrise" if self.quantizer == "quest" else "integer"

    def weight_spec(self, in_features: int) -> QuantSpec:
        """The weight grid of a linear with ``in_features`` inputs; raises if the shape does not fit."""
        if self.group_size and in_features % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} does not divide in_features={in_features}; "
                f"choose a group_size among {GROUP_SIZES} that divides it, or granularity='channel'"
            )
        return QuantSpec(self.w_bits, self.grid, self.clip, self.group_size, self._hadamard_block(in_features))

    def activation_spec(self, in_features: int) -> QuantSpec | None:
        """The per-token grid of the inputs of such a linear, or ``None`` when weight-only."""
        if self.a_bits is None:
            return None
        return QuantSpec(self.a_bits, self.grid, self.a_clip, None, self._hadamard_block(in_features))

    def _hadamard_block(self, in_features: int) -> int | None:
        return largest_pow2_divisor(in_features, HADAMARD_MAX_BLOCK) if self.hadamard else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {unknown}; known fields are {sorted(known)}")
        if "a_clip" not in data:
            # Saved before a_clip existed: activations were quantized with the weight rule.
            data = {**data, "a_clip": data.get("clip", "mse")}
        return cls(**data)


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {shown}")

"""``QuantConfig``: what to quantize in a model, and on which grid."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..kernels.grid import Grid, get_grid, grid_names
from ..kernels.spec import SCALE_RULES, SUPPORTED_BITS, QuantSpec
from ..kernels.tiles import largest_pow2_divisor

GRANULARITIES = ("channel", "group")
GROUP_SIZES = (32, 64, 128)
HADAMARD_MAX_BLOCK = 128
ACTIVATION_CLIPS = ("minmax", "mse", "absmax")

# The seven linears of every Llama block (attention q/k/v/o, SwiGLU gate/up/down), as data.
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_SKIP_MODULES = ("lm_head", "embed_tokens")


@dataclass
class QuantConfig:
    """Which linears to quantize and how.

    Args:
        w_bits: weight bits, one of 2, 3, 4, 8.
        a_bits: input-activation bits (2, 3, 4, 8) or ``None`` for weight-only quantization.
        quantizer: the name of a registered grid (:func:`hf_cage.kernels.grid_names`): ``"quest"`` (mid-rise
            grid, scale ``alpha_b * RMS``, docs/method.md#the-papers-quantizer-quest), ``"int"`` (integer grid
            ``[-2^(b-1), 2^(b-1)-1] * scale``, exportable to int4 formats), or an FP4 grid
            (:mod:`hf_cage.kernels.fp4`, the scale rules of compressed-tensors): ``"mxfp4"`` (E2M1 values, a
            power-of-two E8M0 scale per group of 32 inputs) or ``"nvfp4"`` (E2M1 values, an FP8 E4M3 scale per
            group of 16 times an fp32 global scale per tensor). A grid may fix its bits, its group (then used
            for weights and activations, per token and group) and its scale rule (then ``clip`` / ``a_clip``
            do not apply): the FP4 grids are 4-bit with their format's group and rule. NVFP4 activations use
            a per-layer global scale calibrated during training (``QATLinear.input_global_scale``).
        granularity: ``"channel"`` (one weight scale per output row) or ``"group"``.
        group_size: inputs per weight scale when ``granularity="group"`` (32, 64, 128; default 128; a grid
            that fixes its group, e.g. 32 for mxfp4, 16 for nvfp4, sets it for you).
        hadamard: rotate inputs in blocks of up to 128 before quantizing (weights and activations
            alike). Default: the grid's (True for ``quest``, False for ``int`` and the FP4 grids).
        clip: weight scale rule, ``"mse"`` (Gaussian-MSE-optimal clip ``alpha_b * RMS``, the default),
            ``"absmax"`` or ``"minmax"`` (see ``a_clip``).
        a_clip: activation scale rule (activations always use one scale per token): ``"minmax"``
            (compressed-tensors' dynamic per-token rule, ``scale = absmax / ((2^b - 1) / 2)``, bit for bit
            what stock transformers and vLLM apply at load), ``"mse"`` or ``"absmax"``. Default: the grid's
            (``"minmax"`` for ``int``, ``"mse"`` for ``quest``).
        target_modules: module names (last path component) to quantize.
        skip_modules: names never quantized, even if listed as targets.
    """

    w_bits: int = 4
    a_bits: int | None = 4
    quantizer: str = "quest"
    granularity: str = "channel"
    group_size: int | None = None
    hadamard: bool | None = None
    clip: str | None = None
    a_clip: str | None = None
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGET_MODULES))
    skip_modules: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP_MODULES))

    def __post_init__(self):
        _check_choice("w_bits", self.w_bits, SUPPORTED_BITS)
        _check_choice("a_bits", self.a_bits, (*SUPPORTED_BITS, None))
        _check_choice("quantizer", self.quantizer, grid_names())
        _check_choice("granularity", self.granularity, GRANULARITIES)
        grid = self.quant_grid
        self._grid_settings(grid)
        if self.clip is None:
            self.clip = "mse"
        _check_choice("clip", self.clip, SCALE_RULES)
        if self.a_clip is None:
            self.a_clip = grid.default_activation_clip
        _check_choice("a_clip", self.a_clip, ACTIVATION_CLIPS)
        if self.granularity == "group":
            if self.group_size is None:
                self.group_size = 128
            if grid.fixed_group_size is None:
                _check_choice("group_size", self.group_size, GROUP_SIZES)
        elif self.group_size is not None:
            raise ValueError(f"group_size={self.group_size} needs granularity='group' (got {self.granularity!r})")
        if self.hadamard is None:
            self.hadamard = grid.default_hadamard
        self.target_modules = list(self.target_modules)
        self.skip_modules = list(self.skip_modules)
        if not self.target_modules:
            raise ValueError("target_modules is empty; name at least one module, e.g. ['q_proj', 'v_proj']")

    def _grid_settings(self, grid: Grid) -> None:
        """The grid's bits, and the group and scale rule it fixes, if any; conflicting settings are refused."""
        name, bits = grid.name, "/".join(map(str, grid.bits))
        if self.w_bits not in grid.bits:
            raise ValueError(f"w_bits={self.w_bits}: the {name} grid holds {bits}-bit weights; pass w_bits={bits}")
        if self.a_bits not in (*grid.bits, None):
            raise ValueError(f"a_bits={self.a_bits}: {name} activations are {bits}-bit; pass a_bits={bits} or None")
        group = grid.fixed_group_size
        if group is not None:
            if self.group_size not in (None, group):
                raise ValueError(f"group_size={self.group_size}: {name} uses groups of {group}; leave it unset")
            self.granularity, self.group_size = "group", group
        rule = grid.fixed_scale_rule
        if rule is not None:
            for field_name in ("clip", "a_clip"):
                value = getattr(self, field_name)
                if value not in (None, rule):
                    raise ValueError(
                        f"{field_name}={value!r} does not apply to the {name} grid (its scale rule is the format's "
                        f"own); leave {field_name} unset"
                    )
            self.clip = self.a_clip = rule

    @property
    def quant_grid(self) -> Grid:
        """The registered grid named by ``quantizer``."""
        return get_grid(self.quantizer)

    def weight_spec(self, in_features: int) -> QuantSpec:
        """The weight grid of a linear with ``in_features`` inputs; raises if the shape does not fit."""
        if self.group_size and in_features % self.group_size:
            fix = (
                f"the {self.quantizer} grid fixes its group size"
                if self.quant_grid.fixed_group_size
                else f"choose a group_size among {GROUP_SIZES} that divides it, or granularity='channel'"
            )
            raise ValueError(f"group_size={self.group_size} does not divide in_features={in_features}; {fix}")
        return QuantSpec(self.w_bits, self.quantizer, self.clip, self.group_size, self._hadamard_block(in_features))

    def activation_spec(self, in_features: int) -> QuantSpec | None:
        """The per-token grid of the inputs of such a linear (per token and group on a grid that fixes its group),
        or ``None`` when weight-only."""
        if self.a_bits is None:
            return None
        group = self.quant_grid.fixed_group_size
        return QuantSpec(self.a_bits, self.quantizer, self.a_clip, group, self._hadamard_block(in_features))

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

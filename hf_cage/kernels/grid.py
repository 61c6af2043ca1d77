"""A quantization grid is one registered object; this module holds the base class and the registry.

A :class:`Grid` owns what differs between grids: its name (the user-facing ``QuantConfig.quantizer`` /
``--quant_quantizer`` value, the one vocabulary), its constraints and defaults, its quantizer (the torch twin,
plus a Triton kernel when it has one), its packing into checkpoint tensors, what its packed inference layer
holds, and the words the model card uses. Every other module looks a grid up here (:func:`get_grid`) instead of
testing names. The built-in grids live one file each in :mod:`hf_cage.kernels.grids`; a new grid is one more
file there (or a :func:`register_grid` call) plus its tests: docs/quantization.md, "Adding a grid".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from .spec import QuantSpec

_REGISTRY: dict[str, Grid] = {}
_LEGACY: dict[str, str] = {}  # a name QuantSpec used before the one vocabulary -> the grid's name


class Grid:
    """One quantization grid. Subclass, set the class attributes, implement the methods, :func:`register_grid`.

    Attributes:
        name: the user-facing name (``QuantConfig.quantizer``); ``QuantSpec.grid`` holds it too.
        description: one clause for ``--help`` and the docs.
        bits: the weight and activation widths it takes.
        fixed_group_size: a group size the format fixes for weights and activations alike (then activations are
            quantized per token and group, and ``QuantConfig`` sets ``granularity="group"``); ``None``: the user
            chooses per channel or a group of ``hf_cage.quant.config.GROUP_SIZES`` for weights, one scale per token for
            activations.
        fixed_scale_rule: a scale rule the format fixes (``clip`` and ``a_clip`` then do not apply), or ``None``.
        default_activation_clip / default_hadamard: ``QuantConfig``'s defaults for ``a_clip`` / ``hadamard``.
        integer_codes: values are ``(code + code_offset) * step``, int8 codes in ``[qmin, qmax]`` and fp32 steps:
            what :mod:`hf_cage.kernels.reference`, the int4 GEMMs and the fused straight-through layer take.
        code_offset: see ``integer_codes`` (0 otherwise).
        input_global_scale: activations use one calibrated fp32 scale per layer, the buffer
            ``input_global_scale`` of the training and packed layers (see :meth:`observed_input_scale`).
        packed_layer: the name of the :mod:`hf_cage.layers` class its exports load into (``PackedLinear``, the
            generic one, unless the grid has a faster layer).
        packing: how the packed tensors are laid out, written into the export's metadata.
        legacy_name: the name ``QuantSpec`` used for this grid before the one vocabulary; still accepted, and
            still written as the export metadata's ``weight_grid`` so exports stay byte-identical.
        card_name: how the model card names the weight grid (``card_converted_name``: when an export converted
            the weights to it; default ``card_name``).
        stock_format: the compressed-tensors export format that can hold this grid (``None``: only the hf-cage
            format holds it).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    fixed_group_size: ClassVar[int | None] = None
    fixed_scale_rule: ClassVar[str | None] = None
    default_activation_clip: ClassVar[str] = "mse"
    default_hadamard: ClassVar[bool] = False
    integer_codes: ClassVar[bool] = False
    code_offset: ClassVar[float] = 0.0
    input_global_scale: ClassVar[bool] = False
    packed_layer: ClassVar[str] = "PackedLinear"
    packing: ClassVar[str] = ""
    legacy_name: ClassVar[str | None] = None
    card_name: ClassVar[str] = ""
    card_converted_name: ClassVar[str | None] = None
    stock_format: ClassVar[str | None] = None

    # --- constraints ------------------------------------------------------------------------------------

    def spec_problem(self, spec: QuantSpec) -> str | None:
        """Why ``spec`` (already of this grid) is not a valid grid, or ``None``."""
        if spec.bits not in self.bits:
            return f"bits={spec.bits} is not supported by the {self.name} grid; choose one of {self.bits}"
        fixed = (self.fixed_group_size, self.fixed_scale_rule)
        if any(fixed) and (spec.group_size, spec.scale_rule) != fixed:
            return (
                f"the {self.name} grid is bits={'/'.join(map(str, self.bits))}, group_size={self.fixed_group_size}, "
                f"scale_rule={self.fixed_scale_rule!r}; got bits={spec.bits}, group_size={spec.group_size}, "
                f"scale_rule={spec.scale_rule!r}"
            )
        return None

    # --- quantizer ---------------------------------------------------------------------------------------

    def fake_quantize(
        self, x: torch.Tensor, spec: QuantSpec, backend: str, global_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q(x), straight-through mask)``: ``Q(x)`` in the basis and dtype of ``x``, the bool mask (same shape,
        rotated basis) False where the value was clipped. ``backend`` is ``"torch"`` or ``"triton"`` (a grid
        without a Triton kernel runs its twin on both); ``global_scale``: see ``input_global_scale``."""
        raise NotImplementedError

    def triton_problem(self, in_features: int, spec: QuantSpec) -> str | None:
        """Why the grid's Triton kernel cannot take rows of ``in_features`` inputs, or ``None`` when it can."""
        return f"the {self.name} grid has no Triton kernel"

    def observed_input_scale(self, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """``input_global_scale`` grids: the scale one batch ``x`` asks for; the layer keeps the running minimum."""
        raise NotImplementedError(f"the {self.name} grid has no input_global_scale")

    # --- packing -----------------------------------------------------------------------------------------

    def packing_problem(self, in_features: int, spec: QuantSpec) -> str | None:
        """Why a weight with ``in_features`` inputs cannot be packed on ``spec``, or ``None`` when it can."""
        return None

    def pack(self, weight: torch.Tensor, spec: QuantSpec, backend: str) -> dict[str, torch.Tensor]:
        """Quantize ``weight`` ``(out, in)``: the checkpoint tensors of one linear, ``weight_packed`` first, on
        ``weight``'s device. The shape was checked by :meth:`packing_problem`."""
        raise NotImplementedError

    def unpack(self, tensors: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
        """Inverse of :meth:`pack`: the dequantized ``(out, in)`` weight (``Q(W)``, computed in fp32), in ``dtype``."""
        raise NotImplementedError

    def packed_buffers(
        self, out_features: int, in_features: int, spec: QuantSpec, device=None
    ) -> dict[str, torch.Tensor]:
        """Empty buffers of a packed layer: the names, shapes and dtypes :meth:`pack` returns (``weight_shape``,
        metadata checked on load, excluded)."""
        raise NotImplementedError

    # --- the model card ------------------------------------------------------------------------------------

    def card_activations(self, a_bits: int, group_size: int | None, a_clip: str) -> str:
        """The card's activation row for a model trained with ``a_bits``-bit activations on this grid."""
        return f"{a_bits}-bit per token, {self.name} grid, `a_clip={a_clip!r}`"

    def card_tag(self, w_bits: int) -> str:
        """The Hub tag naming the stored weights."""
        return self.name

    def card_stored(self) -> tuple[str, str]:
        """The hf-cage format's card: what it stores (``"the X grid"``) and why stock loaders cannot serve it."""
        why = "no rotation is applied" if self.stock_format else f"compressed-tensors has no {self.name} grid"
        return f"the {self.name.upper()} grid", why


def register_grid(grid: Grid) -> Grid:
    """Add ``grid`` to the registry; returns it. Raises ``ValueError`` if its name (or legacy name) is taken."""
    names = [grid.name, *([grid.legacy_name] if grid.legacy_name else [])]
    taken = [n for n in names if n in _REGISTRY or n in _LEGACY]
    if not grid.name or taken:
        raise ValueError(f"cannot register grid {grid.name!r}: name {taken or ['']} is empty or taken")
    _REGISTRY[grid.name] = grid
    if grid.legacy_name:
        _LEGACY[grid.legacy_name] = grid.name
    return grid


def unregister_grid(name: str) -> None:
    """Remove the grid registered as ``name`` (tests that register a throwaway grid)."""
    grid = _REGISTRY.pop(name)
    _LEGACY.pop(grid.legacy_name, None)


@contextlib.contextmanager
def registered_grid(grid: Grid) -> Iterator[Grid]:
    """Register ``grid`` for the duration of the block."""
    register_grid(grid)
    try:
        yield grid
    finally:
        unregister_grid(grid.name)


def grid_names() -> tuple[str, ...]:
    """The registered grids' names, in registration order."""
    return tuple(_REGISTRY)


def get_grid(name: str) -> Grid:
    """The grid registered as ``name`` (or under its legacy name); ``ValueError`` listing the registered names."""
    grid = _REGISTRY.get(_LEGACY.get(name, name))
    if grid is None:
        shown = ", ".join(repr(n) for n in _REGISTRY)
        raise ValueError(f"grid {name!r} is not registered; choose one of {shown} (see hf_cage.kernels.grid)")
    return grid

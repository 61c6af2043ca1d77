"""What hf-cage's Triton kernels can take, in plain Python (no triton import): layouts, tiles, shared memory.

Everything a launcher, a layer or a test needs to know *before* compiling lives here, so that the rules
can be checked on any host and a layer can decide at build time whether Triton can run it.

- :func:`largest_pow2_divisor`: the one power-of-two helper (Hadamard block of a layer, quantizer chunk).
- :func:`quant_layout`: how the fused quantizer cuts rows of ``K`` inputs into segments and chunks; raises
  ``ValueError`` for shapes it cannot take (a Hadamard tile narrower than 16, which ``tl.dot`` refuses).
- GEMM tiles: :data:`GEMM_SPACE` is every config the autotuner may try; :func:`gemm_configs` keeps, for
  one problem shape, those of its M bucket that :func:`tile_problem` finds legal: every tile side
  >= 16, ``BLOCK_K`` a multiple of 32 for the int8 ``tl.dot`` of W4A4, a K tile inside one scale group,
  and shared memory (pipeline stages included, :func:`gemm_shared_bytes`) within the device's limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import QuantSpec

MIN_DOT = 16  # smallest tl.dot side a GPU accepts (the interpreter accepts less)
INT8_DOT_K = 32  # int8 tl.dot needs K tiles of a multiple of 32 on tensor cores
MAX_CHUNK = 128  # widest quantizer tile (and widest Hadamard block it rotates)
# Shared memory a block may opt in to, by compute capability (CUDA programming guide, table 21).
SHARED_MEMORY_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
GEMM_KINDS = ("w4a4", "w4a16")


def largest_pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides ``n``, at most ``cap`` (1 for odd ``n``)."""
    block = 1
    while block < cap and n % (block * 2) == 0:
        block *= 2
    return block


@dataclass(frozen=True)
class QuantLayout:
    """How :mod:`hf_cage.kernels.triton_quant` walks rows of ``K`` inputs.

    ``segment``: inputs one program quantizes (a scale group, a Hadamard block holding several groups, or
    the whole row); ``chunk``: tile width it loads at a time; ``group``: inputs per scale;
    ``num_stages``: software pipeline stages (1 with a rotation: the fp32 Hadamard tile is 64 KiB).
    """

    segment: int
    chunk: int
    groups_per_chunk: int
    group: int
    num_stages: int

    def shared_bytes(self, block_m: int) -> int:
        """Upper estimate of shared memory: the staged input tile, plus the Hadamard tile when rotating."""
        hadamard = self.chunk * self.chunk * 4 if self.num_stages == 1 else 0
        return self.num_stages * block_m * self.chunk * 4 + hadamard


def quant_layout(k: int, spec: QuantSpec) -> QuantLayout:
    """The quantizer layout for rows of ``k`` inputs; ``ValueError`` saying why if the kernel cannot take them."""
    group = spec.group_size or k
    block = spec.hadamard_block or 1
    if k % group or k % block:
        raise ValueError(f"last dimension {k} must be a multiple of group_size={group} and hadamard_block={block}")
    segment = max(group, block)
    chunk = largest_pow2_divisor(segment, MAX_CHUNK)
    if chunk < block:
        raise ValueError(f"hadamard_block={block} is wider than {MAX_CHUNK}; the Triton quantizer rotates up to 128")
    if spec.hadamard_block and chunk < MIN_DOT:
        raise ValueError(
            f"hadamard_block={block} with {k} inputs gives a {chunk}-wide tile; the Triton quantizer's tl.dot "
            f"needs >= {MIN_DOT}"
        )
    groups_per_chunk = chunk // group if group < chunk else 1
    return QuantLayout(segment, chunk, groups_per_chunk, group, 1 if spec.hadamard_block else 3)


QUANT_BLOCK_M = 16  # rows per quantizer program on a GPU (64 under the interpreter, fewer programs)


@dataclass(frozen=True)
class GemmTile:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Every config the autotuner may try (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): thin M tiles for decoding,
# square and 128 x 256 ones for prefill and training, K tiles of 32 only for group-32 scales. Kept short on
# purpose: each config compiles once per kernel variant on first use, and tests/test_kernels_compile.py
# compiles all of them for sm_80, sm_89 and sm_90.
GEMM_SPACE = tuple(
    GemmTile(*t)
    for t in (
        (16, 64, 128, 4, 4),
        (16, 128, 128, 4, 3),
        (16, 64, 64, 4, 4),
        (16, 64, 32, 4, 4),
        (32, 64, 128, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 64, 4, 3),
        (64, 64, 32, 4, 4),
        (128, 128, 64, 8, 3),
        (128, 128, 128, 8, 3),
        (128, 64, 128, 4, 4),
        (128, 128, 32, 8, 4),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
    )
)


def m_bucket(m: int) -> int:
    """The autotune key for M: the next power of two, at most 4096 (larger M all tune alike)."""
    bucket = 1
    while bucket < min(m, 4096):
        bucket *= 2
    return bucket


def _block_m_choices(m: int) -> tuple[int, ...]:
    if m <= 16:
        return (16,)
    if m <= 32:
        return (16, 32)
    if m <= 64:
        return (32, 64)
    if m <= 1024:
        return (64, 128)
    return (64, 128, 256)


def gemm_shared_bytes(kind: str, tile: GemmTile, a_bytes: int) -> int:
    """Upper bound of a GEMM tile's shared memory in bytes, pipeline stages included.

    ``max(stages * (A + W) + B * operand_bytes, BLOCK_M x BLOCK_N x 4)``: each stage buffers the activation
    tile ``A = BLOCK_M x BLOCK_K x a_bytes`` and the packed words ``W = BLOCK_K / 8 x BLOCK_N x 4``; the
    unpacked weight tile ``B = BLOCK_K x BLOCK_N`` goes to the dot layout through shared memory in the dot's
    input width (int8 for W4A4, the activation dtype for W4A16); the output tile (fp32 at most) is converted
    for the store through the same memory later. An upper bound of what Triton 3.9 allocates for these
    kernels: ``tests/test_kernels_compile.py`` compiles every config for sm_80, sm_89 and sm_90 and checks
    that it holds and that the kept configs fit.
    """
    if kind not in GEMM_KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {GEMM_KINDS}")
    a_tile = tile.block_m * tile.block_k * a_bytes
    words = tile.block_k // 8 * tile.block_n * 4
    operand_bytes = 1 if kind == "w4a4" else a_bytes
    staged = tile.num_stages * (a_tile + words) + tile.block_k * tile.block_n * operand_bytes
    return max(staged, tile.block_m * tile.block_n * 4)


def tile_problem(
    kind: str, tile: GemmTile, k: int, group_len: int | None, shared_limit: int, a_bytes: int
) -> str | None:
    """Why ``tile`` cannot run a ``kind`` GEMM with ``k`` inputs (``group_len`` per weight scale, None per
    channel) within ``shared_limit`` bytes, or None when it can."""
    if min(tile.block_m, tile.block_n, tile.block_k) < MIN_DOT:
        return f"tile {tile.block_m}x{tile.block_n}x{tile.block_k} has a side under {MIN_DOT} (tl.dot)"
    if kind == "w4a4" and tile.block_k % INT8_DOT_K:
        return f"BLOCK_K={tile.block_k} is not a multiple of {INT8_DOT_K} (int8 tl.dot)"
    if tile.block_k % 8:
        return f"BLOCK_K={tile.block_k} is not a multiple of 8 (packed int4 words)"
    if group_len is not None and group_len % tile.block_k:
        return f"BLOCK_K={tile.block_k} does not divide the scale group of {group_len}"
    need = gemm_shared_bytes(kind, tile, a_bytes)
    if need > shared_limit:
        return (
            f"needs ~{need // 1024} KiB of shared memory at {tile.num_stages} stages, over {shared_limit // 1024} KiB"
        )
    return None


def gemm_configs(
    kind: str, m: int, n: int, k: int, group_len: int | None, shared_limit: int, a_bytes: int
) -> list[GemmTile]:
    """The legal tiles of ``GEMM_SPACE`` for one problem: BLOCK_M from M's bucket (thin tiles for decoding),
    32-wide K tiles only for group-32 scales, every rule of :func:`tile_problem`."""
    legal = [
        t
        for t in GEMM_SPACE
        if (t.block_k > INT8_DOT_K or group_len == INT8_DOT_K)
        and tile_problem(kind, t, k, group_len, shared_limit, a_bytes) is None
    ]
    # BLOCK_M from M's bucket when one of those is legal, else any legal tile (small shared memory, fp32 inputs).
    legal = [t for t in legal if t.block_m in _block_m_choices(m)] or legal
    if not legal:
        raise ValueError(f"no legal {kind} tile for M={m}, N={n}, K={k}, group={group_len}")
    return legal


def interpreter_tile(kind: str, group_len: int | None) -> GemmTile:
    """The single config used under ``TRITON_INTERPRET=1`` (its autotuner takes one config): large tiles,
    few programs, still legal for a GPU."""
    tile = GemmTile(64, 64, largest_pow2_divisor(group_len, 64) if group_len else 64, 4, 1)
    problem = tile_problem(kind, tile, tile.block_k, group_len, SHARED_MEMORY_BYTES[90], 4)
    if problem:
        raise ValueError(f"no legal {kind} tile for weight groups of {group_len}: {problem}")
    return tile

"""Tile rules, the eligibility rule and the per-layer kernel plan: plain Python, no triton, no GPU."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from hf_cage import Int4Linear, QATLinear, QuantConfig
from hf_cage.kernels import QuantSpec, int4_gemm, largest_pow2_divisor, plan_layer, tiles
from hf_cage.kernels.tiles import GemmTile

H100 = tiles.SHARED_MEMORY_BYTES[90]
KNOWN_ILLEGAL_TILE = GemmTile(128, 128, 128, 8, 4)


def test_largest_pow2_divisor():
    sizes = (1, 7, 8, 200, 256, 4096, 11008, 96)
    assert [largest_pow2_divisor(n, 128) for n in sizes] == [1, 1, 8, 8, 128, 128, 128, 32]
    assert largest_pow2_divisor(4096, 16) == 16


@pytest.mark.parametrize(
    "kind, tile, group_len, limit, a_bytes, why",
    [
        # fp32 activations, 128 x 128 x 128 at 4 stages: Triton allocates 281 KiB (test_kernels_compile.py).
        ("w4a16", KNOWN_ILLEGAL_TILE, None, H100, 4, "shared memory at 4 stages, over 227 KiB"),
        ("w4a4", GemmTile(64, 64, 16, 4, 3), None, H100, 1, "multiple of 32"),
        ("w4a4", GemmTile(8, 64, 64, 4, 3), None, H100, 1, "under 16"),
        ("w4a16", GemmTile(64, 64, 64, 4, 3), 32, H100, 2, "does not divide the scale group of 32"),
    ],
)
def test_pruner_rejects_known_illegal_tiles(kind, tile, group_len, limit, a_bytes, why):
    problem = tiles.tile_problem(kind, tile, 4096, group_len, limit, a_bytes)
    assert problem is not None and why in problem
    configs = tiles.gemm_configs(kind, 4096, 4096, 4096, group_len, limit, a_bytes)
    assert tile not in configs and configs


def test_the_largest_w4a4_tile_is_kept_on_every_arch():
    big = GemmTile(128, 128, 128, 8, 3)  # 48 KiB measured (each packed word is loaded once)
    for limit in tiles.SHARED_MEMORY_BYTES.values():
        assert big in tiles.gemm_configs("w4a4", 8192, 4096, 4096, None, limit, 1)


@pytest.mark.parametrize("kind, a_bytes", [("w4a4", 1), ("w4a16", 2), ("w4a16", 4)])
@pytest.mark.parametrize("arch", sorted(tiles.SHARED_MEMORY_BYTES))
def test_every_problem_gets_legal_configs_from_its_m_bucket(kind, a_bytes, arch):
    limit = tiles.SHARED_MEMORY_BYTES[arch]
    for m in (1, 16, 17, 64, 2048, 8192):
        for group_len in (None, 32, 64, 128):
            configs = tiles.gemm_configs(kind, m, 4096, 4096, group_len, limit, a_bytes)
            assert configs
            for t in configs:
                assert tiles.tile_problem(kind, t, 4096, group_len, limit, a_bytes) is None
                assert t in tiles.GEMM_SPACE
            if m <= 16 and (kind, a_bytes, arch) == ("w4a4", 1, 90):
                assert {t.block_m for t in configs} == {16}  # decoding gets thin tiles
            assert tiles.tile_problem(kind, tiles.interpreter_tile(kind, group_len), 4096, group_len, H100, 1) is None


def test_m_bucket_is_the_autotune_key():
    assert [tiles.m_bucket(m) for m in (1, 2, 3, 16, 17, 2048, 8192)] == [1, 2, 4, 16, 32, 2048, 4096]


def test_quant_layout_refuses_hadamard_tiles_under_16_and_takes_narrow_plain_rows():
    with pytest.raises(ValueError, match="8-wide tile; the Triton quantizer's tl.dot needs >= 16"):
        tiles.quant_layout(200, QuantSpec(4, hadamard_block=8))
    layout = tiles.quant_layout(200, QuantSpec(4, "int", "minmax"))
    assert (layout.segment, layout.chunk, layout.num_stages) == (200, 8, 3)
    assert tiles.quant_layout(4096, QuantSpec(4, hadamard_block=128)).num_stages == 1


@pytest.mark.parametrize(
    "w, a, k, expected",
    [
        (QuantSpec(4), QuantSpec(4), 64, "w4a4"),
        (QuantSpec(4, hadamard_block=64), QuantSpec(4, hadamard_block=64), 64, "w4a4"),
        (QuantSpec(4, hadamard_block=64), QuantSpec(4, hadamard_block=32), 64, "w4a16"),
        (QuantSpec(4, "int", group_size=32), QuantSpec(4, "int", "minmax"), 64, "w4a4"),
        (QuantSpec(4), QuantSpec(8), 64, "w4a16"),
        (QuantSpec(4), None, 64, "w4a16"),
        (QuantSpec(8), QuantSpec(4), 64, None),
        (QuantSpec(4), QuantSpec(4), 68, None),
    ],
)
def test_one_eligibility_rule(w, a, k, expected):
    assert int4_gemm(w, a, k) == expected


def test_a_layer_triton_cannot_take_is_planned_on_the_twins_once_and_logged_once(caplog):
    config = QuantConfig()  # QuEST W4A4 with Hadamard: 200 inputs give an 8-wide block
    with caplog.at_level(logging.WARNING, logger="hf_cage.kernels"):
        layers = [QATLinear.from_linear(nn.Linear(200, 24), config) for _ in range(3)]
    plan = layers[0].kernel_plan
    assert not plan.triton and "in_features=200" in plan.reason and "needs >= 16" in plan.reason
    assert plan.backend(torch.zeros(1)) == "torch"
    assert sum("in_features=200" in r.getMessage() for r in caplog.records) == 1
    assert "torch twins on every device" in caplog.records[-1].getMessage()
    assert QATLinear.from_linear(nn.Linear(256, 24), config).kernel_plan.triton


def test_qat_and_packed_layers_share_the_rule():
    config = QuantConfig(quantizer="int")
    qat = QATLinear.from_linear(nn.Linear(64, 16), config)
    packed = Int4Linear(64, 16, True, qat.weight_spec, qat.activation_spec)
    assert qat.kernel_plan.gemm == packed.kernel_plan.gemm == "w4a4"
    a8 = QuantConfig(quantizer="int", a_bits=8)
    qat8 = QATLinear.from_linear(nn.Linear(64, 16), a8)
    assert qat8.kernel_plan.gemm is None
    assert Int4Linear(64, 16, True, qat8.weight_spec, qat8.activation_spec).kernel_plan.gemm == "w4a16"
    assert plan_layer("X", 64, qat.weight_spec, None, quantizes_weight=True, gemm=None).triton

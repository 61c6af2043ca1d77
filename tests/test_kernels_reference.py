"""The GEMM twins against an independent oracle: dequantize both operands in fp64, then one matmul."""

from __future__ import annotations

import pytest
import torch

from hf_cage.kernels import pack_int4, reference


def dequantize_then_matmul(x_codes, x_scales, w_codes, w_scales, x_offset, w_offset) -> torch.Tensor:
    """``((Xc + a) * s_x) @ ((Wc + b) * s_w).T`` in fp64, per-channel or per-group weight scales."""
    n, k = w_codes.shape
    w_scales = w_scales.double().reshape(n, -1)
    w = (w_codes.double() + w_offset).reshape(n, w_scales.shape[1], -1) * w_scales.unsqueeze(-1)
    x = (x_codes.double() + x_offset) * x_scales.double().reshape(-1, 1)
    return x @ w.reshape(n, k).T


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("offsets", [(0.0, 0.0), (0.5, 0.5), (0.0, 0.5), (0.5, 0.0)])
def test_w4a4_twin_equals_dequantize_then_matmul(groups, offsets):
    g = torch.Generator().manual_seed(groups)
    m, n, k = 9, 12, 128
    x_codes = torch.randint(-8, 8, (m, k), generator=g, dtype=torch.int8)
    w_codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    x_scales, w_scales = torch.rand(m, generator=g) + 0.1, torch.rand(n, groups, generator=g) + 0.1
    x_offset, w_offset = offsets
    out = reference.w4a4_matmul_reference(
        x_codes, x_scales, pack_int4(w_codes), w_scales, x_offset=x_offset, w_offset=w_offset
    )
    expected = dequantize_then_matmul(x_codes, x_scales, w_codes, w_scales, x_offset, w_offset)
    # The a*b*K term alone is 0.25 * 128 * s_x * s_w >= 0.3 per entry: dropping it cannot pass.
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_w4a16_twin_equals_dequantize_then_matmul():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 64, generator=g, dtype=torch.float64).float()
    w_codes = torch.randint(-8, 8, (7, 64), generator=g, dtype=torch.int8)
    w_scales = torch.rand(7, 2, generator=g) + 0.1
    out = reference.w4a16_matmul_reference(x, pack_int4(w_codes), w_scales, w_offset=0.5)
    expected = x.double() @ _weights(w_codes, w_scales, 0.5).T
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def _weights(w_codes, w_scales, w_offset):
    n, k = w_codes.shape
    return ((w_codes.double() + w_offset).reshape(n, 2, -1) * w_scales.double().unsqueeze(-1)).reshape(n, k)

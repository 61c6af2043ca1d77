"""The compiled Triton kernels on CUDA at Llama sizes, against the torch twins run on CPU (skipped without CUDA).

Not run in this project's CI (no GPU); `pytest -m gpu` on a CUDA machine. Tolerances as in
tests/test_kernels_triton.py, except that a GPU rounds fp32 -> bf16 to nearest even, so bf16 W4A4
outputs must be bit-exact here.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_triton import assert_codes_match

from hf_cage import QATLinear, QuantConfig, kernels
from hf_cage.kernels import QuantSpec, reference

pytestmark = pytest.mark.gpu


def cuda_randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.mark.parametrize(
    "spec", [QuantSpec(4, hadamard_block=128), QuantSpec(4, "integer", "absmax", 128), QuantSpec(8)], ids=str
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantizer_on_gpu(spec, dtype):
    x = cuda_randn(300, 4096).to(dtype)
    codes, scales = kernels.quantize_rows(x, spec)
    ref_codes, ref_scales = reference.quantize_rows(x.cpu(), spec)
    torch.testing.assert_close(scales.cpu(), ref_scales, rtol=1e-6, atol=0)
    assert assert_codes_match(codes.cpu(), scales.cpu(), x.cpu(), spec) <= 2
    q, mask = kernels.fake_quantize(x, spec)
    ref_q, _ = reference.fake_quantize(x.cpu(), spec)
    atol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(q.cpu().float(), ref_q.float(), rtol=0, atol=atol * float(x.abs().max()))


@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("groups", [1, 32])
def test_w4a4_and_w4a16_on_gpu(m, groups):
    k, n = 4096, 1024
    x_codes = torch.randint(-8, 8, (m, k), dtype=torch.int8)
    x_scales = torch.rand(m) + 0.05
    w_packed = kernels.pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8))
    w_scales = torch.rand(n, groups) + 0.05
    args = (x_codes, x_scales, w_packed, w_scales)
    for out_dtype in (torch.float32, torch.bfloat16):
        out = kernels.w4a4_matmul(*(t.cuda() for t in args), x_offset=0.5, w_offset=0.5, out_dtype=out_dtype)
        expected = kernels.w4a4_matmul_reference(*args, x_offset=0.5, w_offset=0.5, out_dtype=out_dtype)
        rtol = 0 if groups == 1 else 1e-6 if out_dtype == torch.float32 else 2**-7
        torch.testing.assert_close(out.cpu(), expected, rtol=rtol, atol=0)
    x = cuda_randn(m, k, seed=1).bfloat16()
    out = kernels.w4a16_matmul(x, w_packed.cuda(), w_scales.cuda() * 0.01)
    expected = kernels.w4a16_matmul_reference(x.cpu().float(), w_packed, w_scales * 0.01)
    torch.testing.assert_close(out.cpu().float(), expected, rtol=2**-6, atol=2**-6 * float(expected.abs().max()))


def test_qat_linear_w4a4_trains_on_gpu():
    layer = QATLinear.from_linear(torch.nn.Linear(1024, 512).cuda(), QuantConfig())
    x = cuda_randn(4, 64, 1024, seed=2).requires_grad_()
    assert layer.uses_int4_matmul(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()

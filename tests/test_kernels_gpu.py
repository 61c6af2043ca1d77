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
    "spec", [QuantSpec(4, hadamard_block=128), QuantSpec(4, "int", "absmax", 128), QuantSpec(8)], ids=str
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


def test_row_offsets_past_2_31_on_gpu():
    """M x K past 2^31 elements (4.3 GB of bf16 activations): the last rows come out as the twin computes them."""
    k, n = 4096, 64
    m = 2**31 // k + 64
    x = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
    x[-64:] = cuda_randn(64, k, seed=3).bfloat16()
    x[:-64] = 0.5
    spec = QuantSpec(4, hadamard_block=128)
    codes, scales = kernels.quantize_rows(x, spec)
    ref_codes, ref_scales = reference.quantize_rows(x[-64:].cpu(), spec)
    torch.testing.assert_close(scales[-64:].cpu(), ref_scales, rtol=1e-6, atol=0)
    assert assert_codes_match(codes[-64:].cpu(), scales[-64:].cpu(), x[-64:].cpu(), spec) <= 2
    w_packed = kernels.pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8)).cuda()
    w_scales = (torch.rand(n) + 0.05).cuda()
    out = kernels.w4a4_matmul(codes, scales, w_packed, w_scales, x_offset=0.5, w_offset=0.5)
    expected = kernels.w4a4_matmul_reference(
        codes[-64:].cpu(), scales[-64:].cpu(), w_packed.cpu(), w_scales.cpu(), x_offset=0.5, w_offset=0.5
    )
    assert torch.equal(out[-64:].cpu(), expected)
    del codes, out
    out = kernels.w4a16_matmul(x, w_packed, w_scales)
    expected = kernels.w4a16_matmul_reference(x[-64:].cpu().float(), w_packed.cpu(), w_scales.cpu())
    torch.testing.assert_close(out[-64:].cpu().float(), expected, rtol=2**-6, atol=2**-6 * float(expected.abs().max()))


def test_autotuned_configs_are_legal_tiles():
    from hf_cage.kernels import tiles, triton_matmul

    limit = triton_matmul.shared_memory_limit(torch.cuda.current_device())
    for m in (1, 300):
        x_codes = torch.randint(-8, 8, (m, 4096), dtype=torch.int8, device="cuda")
        w_packed = kernels.pack_int4(torch.randint(-8, 8, (512, 4096), dtype=torch.int8)).cuda()
        kernels.w4a4_matmul(x_codes, torch.ones(m, device="cuda"), w_packed, torch.ones(512, device="cuda"))
        best = triton_matmul._tile(triton_matmul._w4a4_autotuned.best_config)
        assert best in tiles.gemm_configs("w4a4", m, 512, 4096, None, limit, 1)


def test_a_shape_triton_cannot_take_runs_on_the_twins_on_gpu():
    layer = QATLinear.from_linear(torch.nn.Linear(200, 64).cuda(), QuantConfig())
    assert not layer.kernel_plan.triton
    x = cuda_randn(3, 200, seed=4).requires_grad_()
    out = layer(x)
    out.sum().backward()
    assert out.is_cuda and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_minmax_rule_is_bit_for_bit_compressed_tensors_on_gpu(bits):
    from test_quantizers import activations_with_ties_and_zeros, compressed_tensors_input_quantizer

    x = activations_with_ties_and_zeros(bits).cuda()
    q, _ = kernels.fake_quantize(x, QuantSpec(bits, "int", "minmax"))
    served = compressed_tensors_input_quantizer(x, bits)
    assert torch.equal(q.view(torch.int32), served.view(torch.int32))

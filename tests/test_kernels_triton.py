"""Triton kernels against their torch twins (run by `make test-triton`: TRITON_INTERPRET=1, own pytest process).

Tolerances, and why:
- int outputs: codes are bit-exact *given the kernel's own scales* (checked against the twin's rounding
  of those scales) except at ties. The kernel sums in another order than torch, and torch's BLAS order
  depends on the CPU model and thread count: scales may differ from the twin's by a few ulps (rtol 1e-6),
  after a Hadamard rotation by up to the scale rule applied to the rotation's worst-case fp32 error
  (:func:`hf_cage.kernels.reference.rotation_error_bound`), and a code may move by one where the exact
  pre-rounding value lies within that error of a tie (the ``minmax`` rule puts every row's largest value
  exactly on one). Flips anywhere else fail; on random data the windows hold under 1% of the values.
- W4A4 GEMM with per-channel scales: bit-exact (same codes and scales, same epilogue order).
  Per-group scales: rtol 1e-6 (fp32 group sum order).
- float outputs: fp32 1e-5 relative to the output's magnitude; bf16 / fp16 one unit in their last place.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

from hf_cage import Int4Linear, QATLinear, QuantConfig, kernels, quantize_model, quantized_layers
from hf_cage.kernels import BACKEND_ENV, QuantSpec, reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"

pytestmark = [
    pytest.mark.triton_interpret,
    pytest.mark.skipif(
        not (INTERPRET or torch.cuda.is_available()),
        reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before import (run `make test-triton`)",
    ),
]

SPECS = [
    QuantSpec(4),
    QuantSpec(4, hadamard_block=128),
    QuantSpec(4, "int", "absmax"),
    QuantSpec(4, "int", "mse", group_size=32),
    QuantSpec(4, "quest", "mse", group_size=64, hadamard_block=128),
    QuantSpec(4, "int", "absmax", group_size=128, hadamard_block=32),
    QuantSpec(8, "quest", "mse", hadamard_block=64),
    QuantSpec(2, "int", "absmax", group_size=32),
    QuantSpec(4, "int", "minmax"),
    QuantSpec(8, "int", "minmax", hadamard_block=128),
]
SHAPES = [(1, 256), (70, 256), (3, 5, 384)]


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")


def use_backend(name: str) -> None:
    os.environ[BACKEND_ENV] = name


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


def exact_rotation(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """``x`` rotated in fp64 (error ~1e-16): the value both backends approximate."""
    x = x.double()
    if not block:
        return x
    h = torch.sign(reference.hadamard_matrix(block, x.device).double()) / block**0.5
    return (x.reshape(*x.shape[:-1], -1, block) @ h).reshape(x.shape)


def rotation_error(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per value, fp64, the largest error an fp32 rotation can make (0 without one)."""
    if not spec.hadamard_block:
        return torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    return reference.rotation_error_bound(x, spec.hadamard_block).double()


def assert_scales_close(scales, ref_scales, x, spec) -> None:
    """Scales agree to 1e-6 (group sums in another order: a few ulps), plus, after a rotation, twice the scale
    rule applied to the rotation's error bound (each value may move by that bound; max and RMS move by at most
    its max and RMS)."""
    atol = 0.0
    if spec.hadamard_block:
        bound = reference._grouped(reference.rotation_error_bound(x, spec.hadamard_block), spec)
        atol = 2 * reference._clip_and_step(bound, spec)[1].squeeze(-1)
    assert ((scales - ref_scales).abs() <= atol + 1e-6 * ref_scales.abs()).all()


def twin_rounding(x: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, ...]:
    """The twin's codes and trust mask for ``x`` given ``scales`` (the steps), and where either may legitimately
    differ from a kernel's.

    A value may round either way where its *exact* pre-rounding value (rotation in fp64) lies within the largest
    error of an fp32 rotation (:func:`reference.rotation_error_bound`, in code units) plus a few ulps of a tie:
    kernel and twin both land within that distance of the exact value, in summation orders that depend on the
    device, the CPU model and the thread count. Without a rotation the window is the ulps alone. The trust mask
    ``|Q - x| <= step / 2`` changes exactly at those ties too.
    """
    step = scales.float().unsqueeze(-1)
    clip = step * (spec.qmax if not spec.code_offset and spec.scale_rule == "absmax" else (2**spec.bits - 1) / 2)
    groups = reference._grouped(reference._rotated_fp32(x, spec), spec)
    codes = reference._codes(groups, clip, step, spec)
    mask = (reference._with_offset(codes, spec) * step - groups).abs() <= step * 0.5
    exact = reference._grouped(exact_rotation(x, spec.hadamard_block), spec)
    value = torch.clamp(exact, -clip, clip) / step + 0.5 if spec.code_offset else exact / step
    window = reference._grouped(rotation_error(x, spec), spec) / step + value.abs() * 2.0**-21
    near_tie = ((value - value.floor()) - 0.5).abs() <= window
    return codes.to(torch.int8).reshape(x.shape), near_tie.reshape(x.shape), mask.reshape(x.shape), window


def assert_codes_match(codes, scales, x, spec) -> int:
    """Codes equal the twin's rounding of the kernel's scales, except one-code flips where the exact value sits
    within the rotation's error bound of a tie (:func:`twin_rounding`); returns the number of flips."""
    expected, near_tie, _, _ = twin_rounding(x, scales, spec)
    flips = codes != expected
    assert near_tie[flips].all(), "a code differs from the twin away from a rounding tie"
    assert ((codes.int() - expected.int()).abs() <= 1).all()
    return int(flips.sum())


def assert_window_is_narrow(x, scales, spec) -> None:
    """The tie windows cover under 1% of the code line (a value uniform between codes falls in one with that
    probability): the check pins the other 99% of codes exactly."""
    window = twin_rounding(x, scales, spec)[3]
    assert (2 * window).clamp(max=1).mean() < 0.01


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_rows_matches_twin(spec, shape):
    x = randn(*shape) * 3
    codes, scales = kernels.quantize_rows(x, spec)
    ref_scales = reference.quantize_rows(x, spec)[1]
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == ref_scales.shape
    assert_scales_close(scales, ref_scales, x, spec)
    assert_codes_match(codes, scales, x, spec)
    assert_window_is_narrow(x, scales, spec)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_fake_quantize_matches_twin(spec, shape):
    x = randn(*shape, seed=1)
    q, mask = kernels.fake_quantize(x, spec)
    codes, scales = kernels.quantize_rows(x, spec)
    assert q.dtype == x.dtype and mask.dtype == torch.bool and mask.shape == x.shape
    assert_scales_close(scales, reference.quantize_rows(x, spec)[1], x, spec)
    assert_codes_match(codes, scales, x, spec)
    # The mask is the twin's for the kernel's scales except at ties; Q is the kernel's codes dequantized and
    # rotated back, within twice the back rotation's error bound (two fp32 evaluations) plus an ulp.
    _, near_tie, twin_mask, _ = twin_rounding(x, scales, spec)
    assert near_tie[mask != twin_mask].all()
    expected = reference.dequantize_rows(codes, scales, spec)
    values = reference.dequantize_rows(codes, scales, dataclasses.replace(spec, hadamard_block=None))
    atol = 2 * rotation_error(values, spec) + 2.0**-22 * expected.abs()
    assert ((q - expected).abs() <= atol).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_quantizer_takes_half_inputs_and_returns_their_dtype(dtype):
    spec = QuantSpec(4, hadamard_block=64)
    x = randn(33, 128, seed=2, dtype=dtype)
    codes, scales = kernels.quantize_rows(x, spec)
    assert_scales_close(scales, reference.quantize_rows(x, spec)[1], x, spec)
    assert_codes_match(codes, scales, x, spec)
    q, _ = kernels.fake_quantize(x, spec)
    assert q.dtype == dtype
    expected = reference.dequantize_rows(codes, scales, spec, dtype)
    torch.testing.assert_close(q, expected, rtol=0, atol=float(x.abs().max()) * 2**-7)


def test_all_zero_rows_get_the_tiny_step_like_the_twin():
    x = torch.zeros(3, 64, device=DEVICE)
    x[1] = randn(64)
    for spec in (QuantSpec(4), QuantSpec(4, "int", "absmax", 32)):
        codes, scales = kernels.quantize_rows(x, spec)
        ref_codes, ref_scales = reference.quantize_rows(x, spec)
        assert torch.equal(codes, ref_codes)
        torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_minmax_kernel_is_bit_for_bit_compressed_tensors(bits):
    """The fused quantizer's minmax rule is the twin's and compressed-tensors' dynamic per-token rule, bit for bit
    (absmax is exact in any order, so here the kernel's scales equal the twin's exactly), zeros and ties included."""
    from test_quantizers import activations_with_ties_and_zeros, compressed_tensors_input_quantizer

    x = activations_with_ties_and_zeros(bits).to(DEVICE)
    spec = QuantSpec(bits, "int", "minmax")
    q, _ = kernels.fake_quantize(x, spec)
    assert torch.equal(q.view(torch.int32), compressed_tensors_input_quantizer(x, bits).view(torch.int32))
    codes, scales = kernels.quantize_rows(x, spec)
    ref_codes, ref_scales = reference.quantize_rows(x, spec)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    assert scales[0, 0, 0] == torch.finfo(torch.float32).eps


def test_a_code_on_a_tie_is_counted_not_hidden():
    # Midrise codes have a boundary at 0: exact zeros after the rotation are ties.
    spec = QuantSpec(4, hadamard_block=16)
    x = torch.ones(2, 64, device=DEVICE)  # H @ ones has one nonzero entry per block: the rest are ties at 0
    codes, scales = kernels.quantize_rows(x, spec)
    near_tie = twin_rounding(x, scales, spec)[1]
    assert near_tie.sum() >= 2 * 60
    flips = assert_codes_match(codes, scales, x, spec)
    assert flips == int((codes != reference.quantize_rows(x, spec)[0]).sum())


def random_codes(*shape, seed):
    return torch.randint(-8, 8, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8).to(DEVICE)


def random_scales(*shape, seed):
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) + 0.05).to(DEVICE)


GEMM_SHAPES = [(1, 48, 128), (70, 96, 256), (65, 64, 384)]
OFFSETS = [(0.0, 0.0), (0.5, 0.5), (0.0, 0.5)]


@pytest.mark.parametrize("mnk", GEMM_SHAPES, ids=str)
@pytest.mark.parametrize("offsets", OFFSETS, ids=str)
def test_w4a4_matmul_per_channel_is_bit_exact(mnk, offsets):
    m, n, k = mnk
    x_codes, x_scales = random_codes(m, k, seed=0), random_scales(m, seed=1)
    w_packed, w_scales = kernels.pack_int4(random_codes(n, k, seed=2)), random_scales(n, seed=3)
    kwargs = dict(x_offset=offsets[0], w_offset=offsets[1])
    out = kernels.w4a4_matmul(x_codes, x_scales, w_packed, w_scales, **kwargs)
    expected = kernels.w4a4_matmul_reference(x_codes, x_scales, w_packed, w_scales, **kwargs)
    assert out.shape == (m, n) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("mnk", GEMM_SHAPES[1:], ids=str)
def test_w4a4_matmul_per_group(group, mnk):
    m, n, k = mnk
    x_codes, x_scales = random_codes(m, k, seed=4), random_scales(m, seed=5)
    w_packed, w_scales = kernels.pack_int4(random_codes(n, k, seed=6)), random_scales(n, k // group, seed=7)
    out = kernels.w4a4_matmul(x_codes, x_scales, w_packed, w_scales, x_offset=0.5, w_offset=0.5)
    expected = kernels.w4a4_matmul_reference(x_codes, x_scales, w_packed, w_scales, x_offset=0.5, w_offset=0.5)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_w4a4_matmul_writes_half_outputs():
    x_codes, x_scales = random_codes(20, 128, seed=8), random_scales(20, seed=9)
    w_packed, w_scales = kernels.pack_int4(random_codes(32, 128, seed=10)), random_scales(32, seed=11)
    for dtype in (torch.float16, torch.bfloat16):
        out = kernels.w4a4_matmul(x_codes, x_scales, w_packed, w_scales, out_dtype=dtype)
        expected = kernels.w4a4_matmul_reference(x_codes, x_scales, w_packed, w_scales, out_dtype=dtype)
        # The interpreter truncates fp32 -> bf16 (a GPU rounds to nearest even): one bf16 ulp there.
        rtol = 2**-7 if INTERPRET and dtype == torch.bfloat16 else 0
        torch.testing.assert_close(out, expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("groups", [1, 2, 4], ids=lambda g: f"groups{g}")
@pytest.mark.parametrize("mnk", GEMM_SHAPES, ids=str)
@pytest.mark.parametrize("w_offset", [0.0, 0.5])
def test_w4a16_matmul_fp32(groups, mnk, w_offset):
    m, n, k = mnk
    x = randn(m, k, seed=12)
    w_packed, w_scales = kernels.pack_int4(random_codes(n, k, seed=13)), random_scales(n, groups, seed=14)
    out = kernels.w4a16_matmul(x, w_packed, w_scales, w_offset=w_offset)
    expected = kernels.w4a16_matmul_reference(x, w_packed, w_scales, w_offset=w_offset)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_w4a16_matmul_half(dtype):
    x = randn(17, 256, seed=15, dtype=dtype)
    w_packed, w_scales = kernels.pack_int4(random_codes(64, 256, seed=16)), random_scales(64, 2, seed=17) * 0.05
    out = kernels.w4a16_matmul(x, w_packed, w_scales, w_offset=0.5)
    assert out.dtype == dtype
    # The kernel dequantizes in fp32 and rounds weights to the activation dtype (fp32 dots when interpreting).
    expected = kernels.w4a16_matmul_reference(x.float(), w_packed, w_scales, w_offset=0.5)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), expected, rtol=2 * eps, atol=4 * eps * float(expected.abs().max()))


def test_forced_triton_backend_really_launches_the_kernels(monkeypatch):
    from hf_cage.kernels import triton_matmul, triton_quant

    calls = []
    for module, name in [(triton_quant, "quantize"), (triton_matmul, "w4a4_matmul"), (triton_matmul, "w4a16_matmul")]:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    layer = QATLinear.from_linear(nn.Linear(128, 32, device=DEVICE), QuantConfig())
    layer(randn(4, 128))
    Int4Linear.from_qat_linear(QATLinear.from_linear(nn.Linear(128, 32, device=DEVICE), QuantConfig(a_bits=None)))(
        randn(4, 128)
    )
    assert calls.count("quantize") >= 3 and "w4a4_matmul" in calls and "w4a16_matmul" in calls
    assert "hf_cage.kernels.triton_quant" in sys.modules


def test_launchers_reject_bad_inputs():
    from hf_cage.kernels import triton_matmul

    x_codes, x_scales = random_codes(4, 64, seed=0), random_scales(4, seed=1)
    w_packed, w_scales = kernels.pack_int4(random_codes(8, 64, seed=2)), random_scales(8, seed=3)
    with pytest.raises(TypeError, match="x_codes must be 2-D int8"):
        triton_matmul.w4a4_matmul(x_codes.int(), x_scales, w_packed, w_scales)
    with pytest.raises(ValueError, match="holds 64 inputs per row but the activations have K=128"):
        triton_matmul.w4a4_matmul(random_codes(4, 128, seed=0), x_scales, w_packed, w_scales)
    with pytest.raises(ValueError, match="grid offsets 0"):
        triton_matmul.w4a4_matmul(x_codes, x_scales, w_packed, w_scales, x_offset=0.25)
    with pytest.raises(ValueError, match="groups of a multiple of 32 inputs, got 16"):
        triton_matmul.w4a4_matmul(x_codes, x_scales, w_packed, random_scales(8, 4, seed=3))
    with pytest.raises(ValueError, match="w_scales must be fp32"):
        triton_matmul.w4a16_matmul(randn(4, 64), w_packed, w_scales.double())


# "int-*" use absmax scales: a max does not depend on the summation order, so both backends get identical
# scales and codes (no ties can differ) and must agree to fp32 rounding. QuEST's RMS scales and Hadamard
# sums differ by ulps, so a value on a rounding tie may take another code: those are compared tie-aware.
QAT_CONFIGS = {
    "quest": QuantConfig(),
    # absmax activations: the extreme lands on qmax = 7 exactly, away from any tie, so ulp noise upstream (the
    # GEMM's fp32 order differs from F.linear's) cannot flip a code and whole models match across backends.
    "int-group32": QuantConfig(quantizer="int", granularity="group", group_size=32, clip="absmax", a_clip="absmax"),
    "quest-group64-a8": QuantConfig(granularity="group", group_size=64, a_bits=8),
    "int-weight-only": QuantConfig(quantizer="int", a_bits=None, clip="absmax"),
    # The int default: minmax activations (compressed-tensors' rule). Its negative extreme sits on a tie
    # (-absmax / (absmax / 7.5) = -7.5), so it is compared layer by layer on identical inputs only.
    "int-minmax": QuantConfig(quantizer="int"),
}


def run_layer(layer, x, grad_out):
    x.grad = layer.weight.grad = layer.bias.grad = None
    out = layer(x)
    out.backward(grad_out)
    return out.detach(), x.grad, layer.weight.grad, layer.bias.grad


def assert_all_close(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


@pytest.mark.parametrize("name", ["quest", "int-group32", "int-minmax"])
def test_qat_linear_w4a4_gemm_and_backward_match_the_straight_through_path(name, monkeypatch):
    """Same Triton quantizers both ways: the W4A4 GEMM + its backward vs F.linear on Q(x), Q(W) + FakeQuantSTE."""
    layer = QATLinear.from_linear(nn.Linear(256, 48, device=DEVICE), QAT_CONFIGS[name])
    x = randn(2, 9, 256, seed=18).requires_grad_()
    grad_out = randn(2, 9, 48, seed=19)
    assert layer.uses_int4_matmul(x)
    fused = run_layer(layer, x, grad_out)
    monkeypatch.setattr(layer, "uses_int4_matmul", lambda x: False)
    assert_all_close(fused, run_layer(layer, x, grad_out))


@pytest.mark.parametrize("name", ["int-group32", "int-weight-only", "int-minmax"])
def test_qat_linear_triton_backend_matches_torch_backend(name):
    layer = QATLinear.from_linear(nn.Linear(256, 48, device=DEVICE), QAT_CONFIGS[name])
    x = randn(2, 9, 256, seed=18).requires_grad_()
    grad_out = randn(2, 9, 48, seed=19)
    use_backend("torch")
    expected = run_layer(layer, x, grad_out)
    use_backend("triton")
    assert layer.uses_int4_matmul(x) == (QAT_CONFIGS[name].a_bits == 4)
    assert_all_close(run_layer(layer, x, grad_out), expected)


@pytest.mark.parametrize("name", QAT_CONFIGS)
@torch.no_grad()
def test_int4_linear_packed_forward_matches_the_qat_layer(name):
    """On Triton the packed layer (W4A4 or W4A16 on ``weight_packed``) equals the QAT layer it was packed from
    (same quantizer kernels, so same codes); with tie-free configs it also equals the torch backend."""
    config = QAT_CONFIGS[name]
    qat = QATLinear.from_linear(nn.Linear(256, 40, device=DEVICE), config)
    packed = Int4Linear.from_qat_linear(qat)
    x = randn(3, 7, 256, seed=20)
    out = packed(x)
    assert out.shape == (3, 7, 40)
    expected = qat(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    if name.startswith("int"):
        use_backend("torch")
        torch.testing.assert_close(out, packed(x), rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@torch.no_grad()
def test_tiny_llama_logits_match_torch_backend():
    # Integer grid, absmax scales, no rotation: identical codes, so the backends agree to fp32 rounding.
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for config in (QAT_CONFIGS["int-group32"], QAT_CONFIGS["int-weight-only"]):
        model = quantize_model(make_tiny_llama().to(DEVICE), config)
        use_backend("torch")
        expected = model(input_ids=tokens).logits
        use_backend("triton")
        logits = model(input_ids=tokens).logits
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@torch.no_grad()
def test_tiny_llama_quest_logits_differ_only_through_ties():
    """QuEST W4A4: the first token's attention output is structured, and after the Hadamard rotation some of
    its entries are exact zeros, which sit on the mid-rise grid's 0 boundary. Either backend's ulp noise picks
    the code there, and a flipped code propagates. So: every layer's Triton codes must equal the twin's rounding
    of the Triton scales except at ties, and the logits agree loosely (measured max 0.087 on logits up to 0.59,
    mean 0.01).
    """
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    model = quantize_model(make_tiny_llama().to(DEVICE), QuantConfig())
    use_backend("torch")
    expected = model(input_ids=tokens).logits
    use_backend("triton")
    flips = []

    def check_codes(layer, args):
        x = args[0].reshape(-1, layer.in_features).detach()
        codes, scales = kernels.quantize_rows(x, layer.activation_spec)
        flips.append(assert_codes_match(codes, scales, x, layer.activation_spec))

    hooks = [layer.register_forward_pre_hook(check_codes) for _, layer in quantized_layers(model)]
    logits = model(input_ids=tokens).logits
    for hook in hooks:
        hook.remove()
    assert len(flips) == 14
    diff = (logits - expected).abs()
    scale = float(expected.abs().max())
    assert diff.max() < 0.25 * scale and diff.mean() < 0.03 * scale


def test_benchmark_dry_run_on_the_triton_backend(capsys, import_benchmark):
    bench = import_benchmark("kernels")
    assert bench.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "hf-cage backend: triton" in out and "| NO |" not in out


def test_qat_linear_w4a4_under_autocast_returns_the_autocast_dtype_like_f_linear():
    layer = QATLinear.from_linear(nn.Linear(128, 32, device=DEVICE), QAT_CONFIGS["int-group32"])
    x = randn(4, 128, seed=21).requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = layer(x)
        use_backend("torch")
        expected = layer(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    # The interpreter truncates fp32 -> bf16 where a GPU rounds: allow two bf16 ulps of the output.
    torch.testing.assert_close(
        out.float(), expected.float(), rtol=2**-6, atol=2**-6 * float(expected.detach().abs().max())
    )


def test_a_layer_shape_the_triton_quantizer_cannot_take_runs_on_the_twins_with_the_same_output(caplog):
    """QuEST W4A4 with 200 inputs: an 8-wide Hadamard block, which the Triton quantizer's tl.dot cannot take.
    The layer is planned on the torch twins when it is built (logged once) and gives the torch backend's output
    bit for bit, forward and backward, with HF_CAGE_BACKEND=triton; the kernel itself still refuses the shape."""
    with caplog.at_level("WARNING", logger="hf_cage.kernels"):
        layer = QATLinear.from_linear(nn.Linear(200, 24, device=DEVICE), QuantConfig())
    assert layer.weight_spec.hadamard_block == 8 and not layer.kernel_plan.triton
    x = randn(2, 5, 200, seed=30).requires_grad_()
    grad_out = randn(2, 5, 24, seed=31)
    triton_run = run_layer(layer, x, grad_out)
    use_backend("torch")
    torch_run = run_layer(layer, x, grad_out)
    for got, want in zip(triton_run, torch_run, strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="needs >= 16"):
        from hf_cage.kernels import triton_quant

        triton_quant.quantize_rows(x.detach(), layer.activation_spec)
    use_backend("triton")
    packed = Int4Linear.from_qat_linear(layer)  # the conversion, too, runs on the twins for this shape
    assert not packed.kernel_plan.triton
    assert torch.equal(packed(x.detach()), layer(x.detach()).detach())


OFFSETS_CHECK = """
import torch
from hf_cage import kernels
from hf_cage.kernels import QuantSpec, reference

k, n, stride = 64, 48, 2**30  # row 2 starts at element 2^31: rows * stride overflows 32-bit offsets
g = torch.Generator().manual_seed(0)
# 2 GiB of address space per operand, of which only 3 rows are ever touched (the pages stay unallocated).
x_codes = torch.empty(2 * stride + k, dtype=torch.int8).as_strided((3, k), (stride, 1))
x_codes.copy_(torch.randint(-8, 8, (3, k), generator=g, dtype=torch.int8))
x_scales = torch.rand(3, generator=g) + 0.1
w_packed = kernels.pack_int4(torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8))
w_scales = torch.rand(n, generator=g) + 0.1
out = kernels.w4a4_matmul(x_codes, x_scales, w_packed, w_scales, x_offset=0.5, w_offset=0.5)
ref = reference.w4a4_matmul_reference(x_codes.contiguous(), x_scales, w_packed, w_scales, x_offset=0.5, w_offset=0.5)
assert torch.equal(out, ref)
x = torch.empty(2 * stride + k, dtype=torch.float16).as_strided((3, k), (stride, 1))
x.copy_(torch.randn(3, k, generator=g))
out = kernels.w4a16_matmul(x, w_packed, w_scales)
ref = reference.w4a16_matmul_reference(x.contiguous().float(), w_packed, w_scales)
torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)
for spec in (QuantSpec(4, hadamard_block=64), QuantSpec(8, "int", "minmax")):
    codes, scales = kernels.quantize_rows(x, spec)
    ref_codes, ref_scales = kernels.quantize_rows(x.contiguous(), spec)  # the same kernel: bit for bit
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
print("ok")
"""


def test_row_offsets_past_2_31_are_64_bit():
    """Rows 2^30 elements apart: row 2 sits at element 2^31. With 32-bit offsets ``rows * stride`` wraps
    negative and the interpreter reads outside the buffer (a segfault, hence a subprocess)."""
    if not INTERPRET:
        pytest.skip("needs the interpreter (on a GPU the TTIR check in test_kernels_compile.py covers it)")
    env = dict(os.environ, TRITON_INTERPRET="1", **{BACKEND_ENV: "triton"})
    result = subprocess.run(
        [sys.executable, "-c", OFFSETS_CHECK], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (result.returncode, result.stderr[-2000:])

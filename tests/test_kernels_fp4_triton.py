"""The fused Triton FP4 quantizer against its torch twin (run by `make test-triton`: TRITON_INTERPRET=1).

Tolerances, and why:
- without a rotation, codes, scales, global scales, Q and the mask are bit-exact: the kernel does the
  twin's operations (IEEE division, exact bit manipulations, the same thresholds) on the same values.
- with a Hadamard rotation, the kernel's ``tl.dot`` sums in another order than torch's matmul (whose order
  depends on the CPU model and thread count), so a rotated value may differ by up to the rotation's
  worst-case fp32 error (:func:`hf_cage.kernels.reference.rotation_error_bound`): a scale may then move by
  one E4M3 / E8M0 step where a group max sits within that error of a boundary, and a code (or the clip
  mask) where a value sits within it of a rounding threshold (NVFP4's largest group lands on the clip at 6
  by construction). Codes are checked against the twin's rounding *of the kernel's own scales*.
- ``Q`` in bf16 under the interpreter: it truncates fp32 -> bf16 (a GPU rounds to nearest even), one ulp.
"""

from __future__ import annotations

import os

import pytest
import torch

from hf_cage.kernels import fp4
from hf_cage.kernels.fp4 import GROUP_SIZE as FP4_GROUP_SIZE
from hf_cage.kernels.reference import hadamard_matrix, hadamard_rotate, rotation_error_bound

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"

pytestmark = [
    pytest.mark.triton_interpret,
    pytest.mark.skipif(
        not (INTERPRET or torch.cuda.is_available()),
        reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before import (run `make test-triton`)",
    ),
]

SHAPES = [(1, 128), (70, 256), (3, 5, 384)]


@pytest.fixture(scope="module")
def tfp4():
    from hf_cage.kernels import triton_fp4  # imports triton: only in this process

    return triton_fp4


def awkward(*shape, seed=0, dtype=torch.float32):
    """Gaussian rows of varied magnitude with an all-zero group, exact zeros, -0.0 and outliers."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x = x * torch.logspace(-3, 2, x.shape[-2] if x.dim() > 1 else 1).unsqueeze(-1)
    flat = x.reshape(-1, shape[-1])
    flat[0, :32] = 0.0
    if flat.shape[0] > 4:
        flat[1, 5] = -0.0
        flat[2, 7] = 1e4
        flat[3, 40] = -3e3
        flat[4, ::3] = 0.0
    return x.to(device=DEVICE, dtype=dtype)


def assert_same_scales(scales, ref_scales):
    assert scales.dtype == ref_scales.dtype and scales.shape == ref_scales.shape
    assert torch.equal(scales.view(torch.uint8), ref_scales.view(torch.uint8))


@pytest.mark.parametrize("fmt", tuple(FP4_GROUP_SIZE))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_is_bit_exact_without_rotation(tfp4, fmt, shape):
    x = awkward(*shape, seed=1)
    codes, scales, gs = tfp4.quantize_codes(x, fmt)
    ref_codes, ref_scales, ref_gs = fp4.quantize(x, fmt)
    assert_same_scales(scales, ref_scales)
    assert (gs is None and ref_gs is None) or torch.equal(gs, ref_gs)
    assert codes.dtype == torch.int8 and torch.equal(codes, ref_codes)


@pytest.mark.parametrize("fmt", tuple(FP4_GROUP_SIZE))
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_fake_quantize_is_bit_exact_without_rotation(tfp4, fmt, shape):
    x = awkward(*shape, seed=2)
    q, mask = tfp4.fake_quantize(x, fmt)
    ref_q, ref_mask = fp4.fake_quantize(x, fmt)
    assert q.dtype == x.dtype and mask.dtype == torch.bool
    assert torch.equal(q, ref_q) and torch.equal(mask, ref_mask)
    assert not mask.all()  # the outliers' groups clip something: the mask is not trivially True


@pytest.mark.parametrize("fmt", tuple(FP4_GROUP_SIZE))
def test_a_given_global_scale_is_used(tfp4, fmt):
    x = awkward(20, 128, seed=3)
    gs = torch.tensor([37.0], device=DEVICE) if fmt == "nvfp4" else None
    codes, scales, _ = tfp4.quantize_codes(x, fmt, global_scale=gs)
    ref_codes, ref_scales, _ = fp4.quantize(x, fmt, global_scale=gs)
    assert_same_scales(scales, ref_scales)
    assert torch.equal(codes, ref_codes)
    q, _ = tfp4.fake_quantize(x, fmt, global_scale=gs)
    assert torch.equal(q, fp4.fake_quantize(x, fmt, global_scale=gs)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", tuple(FP4_GROUP_SIZE))
def test_half_inputs_use_the_half_scale_rule(tfp4, fmt, dtype):
    x = awkward(33, 128, seed=4, dtype=dtype)
    codes, scales, gs = tfp4.quantize_codes(x, fmt)
    ref_codes, ref_scales, ref_gs = fp4.quantize(x, fmt)
    assert_same_scales(scales, ref_scales)
    assert (gs is None and ref_gs is None) or torch.equal(gs, ref_gs)
    assert torch.equal(codes, ref_codes)
    q, mask = tfp4.fake_quantize(x, fmt)
    ref_q, ref_mask = fp4.fake_quantize(x, fmt)
    assert q.dtype == dtype and torch.equal(mask, ref_mask)
    ulp = 2**-7 if INTERPRET and dtype == torch.bfloat16 else 0
    torch.testing.assert_close(q, ref_q, rtol=ulp, atol=0)


def group_steps(amax, fmt, gs):
    """The scale rule for group maxima ``amax`` (fp32) under the global scale ``gs``: fp32 effective steps."""
    stored = fp4.mx_scale_exponents(amax) if fmt == "mxfp4" else fp4.nvfp4_group_scales(amax, gs)
    return fp4.effective_scales(stored, fmt, gs)


@pytest.mark.parametrize("hadamard_block", [16, 64, 128])
@pytest.mark.parametrize("fmt", tuple(FP4_GROUP_SIZE))
def test_rotated_quantization_matches_the_twin(tfp4, fmt, hadamard_block):
    """With a rotation, what is guaranteed on every device, CPU model and thread count: each rotated value lies
    within :func:`rotation_error_bound` of the exact (fp64) one, in the kernel and in the twin alike. So the
    global scale is the twin's for a tensor maximum within that bound, each group scale lies between the
    rule's scales for the group maximum minus and plus twice the bound (the rule is monotone), and, given the
    kernel's scales, codes and the clip mask are the twin's except where the exact scaled value lies within the
    bound (plus ulps) of an E2M1 rounding edge, of 0 (the sign of a tiny value) or of the clip at 6, where the
    code moves by one step. On this data such windows hold under 1% of the values."""
    x = awkward(70, 256, seed=5)
    group = FP4_GROUP_SIZE[fmt]
    codes, scales, gs = tfp4.quantize_codes(x, fmt, hadamard_block=hadamard_block)
    ref_codes, ref_scales, ref_gs = fp4.quantize(x, fmt, hadamard_block=hadamard_block)
    rotated = hadamard_rotate(x.float(), hadamard_block).unflatten(-1, (-1, group))
    bound = 2 * rotation_error_bound(x, hadamard_block).unflatten(-1, (-1, group))  # kernel vs twin
    if gs is not None:
        amax = rotated.abs().amax()
        assert fp4.nvfp4_global_scale(amax + bound.max()) <= gs <= fp4.nvfp4_global_scale(amax - bound.max())
    amax = rotated.abs().amax(-1)
    step = fp4.effective_scales(scales, fmt, gs)
    low, high = group_steps((amax - bound.amax(-1)).clamp_min(0), fmt, gs), group_steps(amax + bound.amax(-1), fmt, gs)
    assert ((low <= step) & (step <= high)).all()
    # Codes: the twin's rounding of the kernel's own scales, except within the bound of a threshold.
    step = step.unsqueeze(-1)
    scaled = (rotated / step).flatten(-2)
    expected = fp4.e2m1_codes(scaled)
    exact = x.double().unflatten(-1, (-1, hadamard_block)) @ torch.sign(
        hadamard_matrix(hadamard_block, x.device).double()
    )
    exact = (exact.flatten(-2) / hadamard_block**0.5).unflatten(-1, (-1, group)).abs() / step
    window = (bound / 2 / step + exact * 2.0**-21).flatten(-2)
    exact = exact.flatten(-2)
    thresholds = torch.tensor([0.0] + [e for e, _ in fp4._E2M1_EDGES] + [fp4.E2M1_MAX], device=DEVICE)
    near_edge = (exact.unsqueeze(-1) - thresholds.double()).abs().amin(-1) <= window
    assert (2 * window).clamp(max=1).mean() < 0.01
    flips = codes != expected
    assert near_edge[flips].all(), "a code differs from the twin away from a rounding threshold"
    magnitude_step = ((codes & 7).int() - (expected & 7).int()).abs()
    assert (magnitude_step <= 1).all() and ((codes & 8) == (expected & 8))[magnitude_step > 0].all()
    q, mask = tfp4.fake_quantize(x, fmt, hadamard_block=hadamard_block)
    assert near_edge[mask != (scaled.abs() <= fp4.E2M1_MAX)].all()
    # Q: the kernel's codes dequantized and rotated back, within two back rotations' error bound.
    dequantized = fp4.dequantize(codes, scales, fmt, global_scale=gs, hadamard_block=hadamard_block)
    values = fp4.dequantize(codes, scales, fmt, global_scale=gs)
    atol = 2 * rotation_error_bound(values, hadamard_block) + 2.0**-22 * dequantized.abs()
    assert ((q - dequantized).abs() <= atol).all()
    # The twin's own codes: the same flips where its scales are the kernel's.
    same_scale = (scales.float() == ref_scales.float()).repeat_interleave(group, -1)
    assert near_edge[(codes != ref_codes) & same_scale].all() and (ref_gs is None) == (gs is None)


def test_e4m3_and_e8m0_edges(tfp4):
    # MX: group maxima at and around the rounding points; NV: group scales at e4m3 ties, subnormals, the clamp.
    mx = torch.zeros(8, 32, device=DEVICE)
    mx[:, 0] = torch.tensor([4.0, 6.0, 6.999999, 7.0, 8.0, 1e-40, 3.0e38, 0.0])
    assert_same_scales(tfp4.quantize_codes(mx, "mxfp4")[1], fp4.quantize(mx, "mxfp4")[1])
    nv = torch.zeros(10, 16, device=DEVICE)
    # amax / 6 with gs = 1: 1.0625 (e4m3 tie 1.0 | 1.125 -> 1.0), 1.1875 (tie 1.125 | 1.25 -> 1.25),
    # 2^-9 * 1.5 (subnormal tie -> 2^-8), 2^-10 (half the smallest subnormal -> 0 -> 0.125), 500 (clamp).
    nv[:, 0] = torch.tensor([1.0625, 1.1875, 1.5 * 2**-9, 2**-10, 500.0, 1.0, 0.3, 2**-7, 0.0, 448.0]) * 6
    gs = torch.ones(1, device=DEVICE)
    scales = tfp4.quantize_codes(nv, "nvfp4", global_scale=gs)[1]
    assert_same_scales(scales, fp4.quantize(nv, "nvfp4", global_scale=gs)[1])
    assert scales[:5, 0].float().tolist() == [1.0, 1.25, 2**-8, 0.125, 448.0]


def test_rejects_bad_shapes(tfp4):
    with pytest.raises(ValueError, match="group size 16"):
        tfp4.quantize_codes(torch.zeros(2, 40, device=DEVICE), "nvfp4")
    with pytest.raises(ValueError, match="choose one of"):
        tfp4.quantize_codes(torch.zeros(2, 64, device=DEVICE), "int4")
    with pytest.raises(TypeError):
        tfp4.quantize_codes(torch.zeros(2, 64, dtype=torch.int8, device=DEVICE), "mxfp4")


@pytest.mark.parametrize("fmt", tuple(FP4_GROUP_SIZE))
def test_e2m1_ties_round_to_the_even_mantissa(tfp4, fmt):
    # Scale 1 for both grids (MX: amax 6 -> byte 127; NV: gs = 1, amax 6 -> s8 = 1.0): values sit on the ties.
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]
    x = torch.tensor(ties + [-t for t in ties] + [0.0] * 16, device=DEVICE).reshape(1, 32)
    gs = torch.ones(1, device=DEVICE) if fmt == "nvfp4" else None
    codes, _, _ = tfp4.quantize_codes(x, fmt, global_scale=gs)
    # 0.25->0, 0.75->1 (0b010), 1.25->1, 1.75->2 (0b100), 2.5->2, 3.5->4 (0b110), 5->4, 6 (0b111); sign 0b1000
    magnitudes = [0b000, 0b010, 0b010, 0b100, 0b100, 0b110, 0b110, 0b111]
    expected = magnitudes + [m | 0b1000 for m in magnitudes] + [0] * 16
    assert codes[0].tolist() == expected
    assert torch.equal(codes, fp4.quantize(x, fmt, global_scale=gs)[0])


# --- through the kernels seam and QATLinear -------------------------------------------------------


@pytest.mark.parametrize("fmt", tuple(FP4_GROUP_SIZE))
def test_the_kernels_seam_dispatches_fp4_grids_to_the_fused_quantizer(tfp4, fmt, monkeypatch):
    from hf_cage import kernels
    from hf_cage.quant.config import QuantConfig

    calls = []
    monkeypatch.setattr(tfp4, "quantize", lambda *a, _f=tfp4.quantize, **k: calls.append(1) or _f(*a, **k))
    spec = QuantConfig(quantizer=fmt).weight_spec(256)
    x = awkward(70, 256, seed=11)
    q, mask = kernels.fake_quantize(x, spec, backend="triton")
    ref_q, ref_mask = fp4.fake_quantize(x, fmt)
    assert torch.equal(q, ref_q) and torch.equal(mask, ref_mask)
    codes, scales, gs = kernels.quantize_fp4(x, spec, backend="triton")
    ref_codes, ref_scales, ref_gs = fp4.quantize(x, fmt)
    assert torch.equal(codes, ref_codes) and torch.equal(scales.view(torch.uint8), ref_scales.view(torch.uint8))
    assert (gs is None and ref_gs is None) or torch.equal(gs, ref_gs)
    assert len(calls) == 2


@pytest.mark.parametrize("fmt", tuple(FP4_GROUP_SIZE))
def test_fp4_qat_linear_on_triton_equals_the_torch_twins(tfp4, fmt, monkeypatch):
    """Forward and straight-through backward of an FP4 QATLinear: Triton quantizer vs the twin, bit for bit."""
    from hf_cage import QATLinear
    from hf_cage.quant.config import QuantConfig

    calls = []
    monkeypatch.setattr(tfp4, "quantize", lambda *a, _f=tfp4.quantize, **k: calls.append(1) or _f(*a, **k))

    torch.manual_seed(0)
    layers = {}
    for backend in ("triton", "torch"):
        linear = torch.nn.Linear(128, 48).to(DEVICE)
        torch.manual_seed(0)
        linear.reset_parameters()
        layer = QATLinear.from_linear(linear, QuantConfig(quantizer=fmt))
        if backend == "torch":
            layer.kernel_plan = type(layer.kernel_plan)(False, None, "test: the twins")
        layers[backend] = layer
    assert layers["triton"].kernel_plan.triton and layers["triton"].kernel_plan.gemm is None
    x = awkward(2, 9, 128, seed=12)
    outs, grads = {}, {}
    for backend, layer in layers.items():
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.backward(torch.ones_like(out))
        outs[backend], grads[backend] = out, (xi.grad, layer.weight.grad)
    assert len(calls) == 2  # the triton layer quantized its input and its weight on the fused kernel, once each
    assert torch.equal(outs["triton"], outs["torch"])
    assert torch.equal(grads["triton"][0], grads["torch"][0]) and torch.equal(grads["triton"][1], grads["torch"][1])

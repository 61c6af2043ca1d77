"""FP4 twins (hf_cage.kernels.fp4): golden scale / rounding / packing rules and equality with compressed-tensors.

Every comparison with compressed-tensors is exact (atol=0, rtol=0): the twin claims to be its arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4
from compressed_tensors.quantization.utils.helpers import (
    calculate_qparams,
    compute_dynamic_scales_and_zp,
    generate_gparam,
)

from hf_cage.kernels import fp4
from hf_cage.kernels.fp4 import GROUP_SIZE
from hf_cage.kernels.reference import hadamard_rotate

MXFP4 = preset_name_to_scheme("MXFP4", ["Linear"])
NVFP4 = preset_name_to_scheme("NVFP4", ["Linear"])


def f32(*values):
    return torch.tensor(values, dtype=torch.float32)


def above(v: float) -> float:
    """The next fp32 after ``v`` (one ulp up)."""
    return torch.nextafter(f32(v), f32(float("inf"))).item()


def below(v: float) -> float:
    return torch.nextafter(f32(v), f32(0.0)).item()


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def awkward(rows: int, cols: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Gaussian rows of varied magnitude, an all-zero group, exact zeros and -0.0, and outliers."""
    x = randn(rows, cols, seed=seed) * torch.logspace(-3, 2, rows).unsqueeze(1)
    x[0, :32] = 0.0
    x[1, 5] = -0.0
    x[2, 7] = 1e4
    x[3, 40] = -3e3
    x[4, ::3] = 0.0
    return x.to(dtype)


# --- E2M1 rounding -------------------------------------------------------------------------------

# (input, E2M1 value, 4-bit code sbbb: sign, then the magnitude index into 0, .5, 1, 1.5, 2, 3, 4, 6)
E2M1_GOLDEN = [
    (0.25, 0.0, 0b0000),  # tie 0 | 0.5 -> even mantissa: 0
    (above(0.25), 0.5, 0b0001),
    (0.75, 1.0, 0b0010),  # tie 0.5 | 1 -> 1 (mantissa 0)
    (below(0.75), 0.5, 0b0001),
    (1.25, 1.0, 0b0010),  # tie 1 | 1.5 -> 1
    (above(1.25), 1.5, 0b0011),
    (1.75, 2.0, 0b0100),  # tie 1.5 | 2 -> 2
    (2.5, 2.0, 0b0100),  # tie 2 | 3 -> 2
    (above(2.5), 3.0, 0b0101),
    (3.5, 4.0, 0b0110),  # tie 3 | 4 -> 4
    (5.0, 4.0, 0b0110),  # tie 4 | 6 -> 4
    (above(5.0), 6.0, 0b0111),
    (7.0, 6.0, 0b0111),  # clamped to 6
    (-3.0, -3.0, 0b1101),
    (-1e9, -6.0, 0b1111),
    (-0.1, -0.0, 0b1000),  # a negative value rounding to zero keeps its sign
    (-0.0, 0.0, 0b0000),  # but -0.0 itself is code 0 (torch.sign(-0.0) == 0 in compressed-tensors)
    (0.0, 0.0, 0b0000),
]


@pytest.mark.parametrize("value, expected, code", E2M1_GOLDEN, ids=lambda v: repr(v))
def test_e2m1_golden(value, expected, code):
    codes = fp4.e2m1_codes(f32(value))
    assert codes.dtype == torch.int8 and codes.item() == code
    rounded = fp4.e2m1_round(f32(value))
    assert rounded.item() == expected and torch.signbit(rounded).item() == bool(code & 8)
    reference = cast_to_fp4(torch.clamp(f32(value), -6.0, 6.0))
    assert torch.equal(rounded, reference) and torch.equal(torch.signbit(rounded), torch.signbit(reference))


def test_e2m1_rounding_equals_compressed_tensors_on_a_dense_sweep():
    v = torch.cat([torch.linspace(-8, 8, 64001), randn(10000, seed=3) * 3])
    ours = fp4.e2m1_round(v)
    theirs = cast_to_fp4(torch.clamp(v, -6.0, 6.0))
    assert torch.equal(ours, theirs) and torch.equal(torch.signbit(ours), torch.signbit(theirs))


def test_code_table_round_trips():
    codes = torch.arange(16, dtype=torch.int8)
    values = fp4.e2m1_values(codes)
    assert values[:8].tolist() == list(fp4.E2M1_VALUES) and (-values[8:]).tolist() == list(fp4.E2M1_VALUES)
    assert torch.equal(fp4.e2m1_codes(values), torch.where(codes == 8, 0, codes).to(torch.int8))  # -0.0 -> code 0


# --- scale rules ---------------------------------------------------------------------------------

# (group amax, E8M0 byte, scale). fp32 mantissa bits m: 1.m >= 1.75 rounds the power of two up, else down;
# byte = 127 + exponent - 2.
MX_GOLDEN = [
    (4.0, 0b0111_1111, 1.0),  # 0 10000001 000... = 1.0 x 2^2: exactly a power of two -> 127 + 2 - 2
    (above(4.0), 0b0111_1111, 1.0),  # 0 10000001 000...01: just above, still 2^2
    (6.0, 0b0111_1111, 1.0),  # 0 10000001 100...: 1.5 x 2^2 -> down: 6 / 1 = 6 fits
    (below(7.0), 0b0111_1111, 1.0),  # 0 10000001 1011...1: 1.7499999 x 2^2 -> down (6.99.. clips to 6)
    (7.0, 0b1000_0000, 2.0),  # 0 10000001 110...: 1.75 x 2^2 -> up to 2^3 -> 128
    (8.0, 0b1000_0000, 2.0),  # 0 10000010 000...: 2^3 -> 128
    (above(8.0), 0b1000_0000, 2.0),
    (1.0, 0b0111_1101, 0.25),  # 2^0 -> 125: 1.0 / 0.25 = 4
    (0.0, 0b0000_0000, 2.0**-127),  # log2(0) = -inf, clamped to byte 0
    (2.0**-126, 0b0000_0000, 2.0**-127),  # 127 - 126 - 2 < 0, clamped
    (2.0**127, 0b1111_1100, 2.0**125),  # the largest fp32 power of two: 127 + 127 - 2
]


@pytest.mark.parametrize("amax, byte, scale", MX_GOLDEN, ids=lambda v: repr(v))
def test_mx_shared_exponent_golden(amax, byte, scale):
    exponents = fp4.mx_scale_exponents(f32(amax))
    assert exponents.dtype == torch.uint8 and exponents.item() == byte
    assert fp4.mx_scales(exponents).item() == scale
    theirs, _ = calculate_qparams(f32(-amax), f32(amax), MXFP4.weights)
    assert torch.equal(fp4.mx_scales(exponents), theirs)


def test_nvfp4_global_and_group_scale_golden():
    # gs = 448 * 6 / amax, which torch evaluates as 2688 * (1 / amax) (Tensor.__rtruediv__), two roundings:
    # amax 2688 -> 1.0; amax 448 -> 1/448 = 0x3B124925 -> x 2688 = 6.0000005 = 0x40C00001, not 6.0 (0x40C00000);
    # amax 0 -> clamped to the smallest normal -> 2688 / 2^-126 = inf -> 1.0.
    assert fp4.nvfp4_global_scale(f32(2688.0)).tolist() == [1.0]
    assert fp4.nvfp4_global_scale(f32(448.0)).view(torch.int32).tolist() == [0x40C00001]
    assert fp4.nvfp4_global_scale(f32(0.0)).tolist() == [1.0]
    gs = f32(1.0)
    # e4m3 bits s eeee mmm (bias 7):
    # 6 / 6 = 1.0           -> 0 0111 000 (0x38)
    # 6.5 / 6 = 1.0833      -> nearest of 1.0 (0x38) and 1.125 (0 0111 001, 0x39): 1.125
    # 0                     -> 0, replaced by 0.125 = 0 0100 000 (0x20)
    # 3000 / 6 = 500 > 448  -> clamped to 448 = 0 1111 110 (0x7e)
    # 6e-4 / 6 = 1e-4       -> below half the smallest subnormal 2^-9: 0 -> 0.125 (0x20)
    amax = f32(6.0, 6.5, 0.0, 3000.0, 6e-4)
    scales = fp4.nvfp4_group_scales(amax, gs)
    assert scales.dtype == torch.float8_e4m3fn
    assert scales.view(torch.uint8).tolist() == [0x38, 0x39, 0x20, 0x7E, 0x20]
    theirs, _ = calculate_qparams(-amax, amax, NVFP4.weights, global_scale=gs)
    assert torch.equal(scales.float(), theirs)
    x = randn(4, 64, seed=5) * 7
    assert torch.equal(fp4.nvfp4_global_scale(x.abs().amax()), generate_gparam(x.amin(), x.amax()))


def test_bf16_nvfp4_scale_arithmetic_is_done_in_bf16_like_compressed_tensors():
    x = awkward(16, 64, seed=6, dtype=torch.bfloat16)
    _, scales, gs = fp4.quantize(x, "nvfp4")
    assert torch.equal(gs, generate_gparam(x.amin(), x.amax()))  # 2688 / amax in bf16, then fp32
    groups = x.unflatten(-1, (4, 16))
    theirs, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), NVFP4.weights, global_scale=gs)
    assert torch.equal(scales.float(), theirs)


# --- packing -------------------------------------------------------------------------------------


def test_packing_nibble_order_golden():
    # input 2j in the low nibble, 2j+1 in the high: codes (1, 2) -> 0b0010_0001; (0b1111, 0b1000) -> 0b1000_1111
    codes = torch.tensor([[0b0001, 0b0010, 0b1111, 0b1000]], dtype=torch.int8)
    packed = fp4.pack_fp4(codes)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0b0010_0001, 0b1000_1111]]
    assert torch.equal(packed, pack_fp4_to_uint8(fp4.e2m1_values(codes)))
    assert torch.equal(fp4.unpack_fp4(packed), codes)


def test_packing_equals_compressed_tensors_and_round_trips():
    codes = torch.randint(0, 16, (3, 5, 64), generator=torch.Generator().manual_seed(2), dtype=torch.int8)
    packed = fp4.pack_fp4(codes)
    assert packed.shape == (3, 5, 32)
    assert torch.equal(packed.reshape(15, 32), pack_fp4_to_uint8(fp4.e2m1_values(codes).reshape(15, 64)))
    assert torch.equal(fp4.unpack_fp4(packed), codes)
    unpacked = unpack_fp4_from_uint8(packed.reshape(15, 32), 15, 64, dtype=torch.float32)
    assert torch.equal(unpacked, fp4.e2m1_values(codes).reshape(15, 64))


def test_packing_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        fp4.pack_fp4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(TypeError):
        fp4.pack_fp4(torch.zeros(2, 4))
    with pytest.raises(TypeError):
        fp4.unpack_fp4(torch.zeros(2, 4, dtype=torch.int8))


# --- quantizers against compressed-tensors -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mxfp4_weights_equal_compressed_tensors(dtype):
    w = awkward(48, 128, seed=1, dtype=dtype)
    codes, scales, gs = fp4.quantize(w, "mxfp4")
    assert gs is None and codes.shape == w.shape and scales.shape == (48, 4) and scales.dtype == torch.uint8
    groups = w.unflatten(-1, (4, 32))
    ct_scale, ct_zp = calculate_qparams(groups.amin(-1), groups.amax(-1), MXFP4.weights)
    assert torch.equal(fp4.mx_scales(scales).to(dtype), ct_scale)
    q, _ = fp4.fake_quantize(w, "mxfp4")
    assert torch.equal(q, ct_fake_quantize(w, ct_scale, ct_zp, MXFP4.weights))
    compressed = MXFP4PackedCompressor.compress({"weight": w, "weight_scale": ct_scale}, MXFP4)
    assert torch.equal(compressed["weight_packed"], fp4.pack_fp4(codes))
    assert torch.equal(compressed["weight_scale"], scales)
    dense = MXFP4PackedCompressor.decompress(compressed, MXFP4)["weight"]
    assert torch.equal(dense, fp4.dequantize(codes, scales, "mxfp4", dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nvfp4_weights_equal_compressed_tensors(dtype):
    w = awkward(48, 128, seed=2, dtype=dtype)
    codes, scales, gs = fp4.quantize(w, "nvfp4")
    assert scales.shape == (48, 8) and scales.dtype == torch.float8_e4m3fn and gs.dtype == torch.float32
    ct_gs = generate_gparam(w.amin(), w.amax())
    groups = w.unflatten(-1, (8, 16))
    ct_scale, ct_zp = calculate_qparams(groups.amin(-1), groups.amax(-1), NVFP4.weights, global_scale=ct_gs)
    assert torch.equal(gs, ct_gs) and torch.equal(scales.float(), ct_scale)
    q, _ = fp4.fake_quantize(w, "nvfp4")
    assert torch.equal(q, ct_fake_quantize(w, ct_scale, ct_zp, NVFP4.weights, global_scale=ct_gs))
    state = {"weight": w, "weight_scale": ct_scale, "weight_global_scale": ct_gs}
    compressed = NVFP4PackedCompressor.compress(state, NVFP4)
    assert torch.equal(compressed["weight_packed"], fp4.pack_fp4(codes))
    assert torch.equal(compressed["weight_scale"].view(torch.uint8), scales.view(torch.uint8))
    # compressed-tensors decompresses into bf16: bf16(e2m1 * fp32(s8 / gs)).
    dense = NVFP4PackedCompressor.decompress(compressed, NVFP4)["weight"]
    assert torch.equal(dense, fp4.dequantize(codes, scales, "nvfp4", global_scale=gs, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", tuple(GROUP_SIZE))
def test_dynamic_activations_equal_the_loaders_forward_rule(fmt, dtype):
    """What compressed-tensors' forward hook does to a Linear input at load: dynamic per token-group scales."""
    x = awkward(10, 256, seed=4, dtype=dtype).reshape(2, 5, 256)
    args = (MXFP4 if fmt == "mxfp4" else NVFP4).input_activations
    gs = fp4.nvfp4_global_scale(f32(37.5)) if fmt == "nvfp4" else None  # a calibrated input_global_scale
    scale, zp = compute_dynamic_scales_and_zp(value=x, args=args, module=None, global_scale=gs)
    expected = ct_fake_quantize(x, scale, zp, args, global_scale=gs)
    q, mask = fp4.fake_quantize(x, fmt, global_scale=gs)
    assert q.dtype == dtype and torch.equal(q, expected)
    assert mask.shape == x.shape and mask.dtype == torch.bool


def test_nvfp4_fully_dynamic_activations_equal_a_unit_global_scale():
    """``dynamic: true`` (no input_global_scale) is the group rule with no global scale, i.e. gs = 1."""
    x = awkward(8, 64, seed=7)
    args = NVFP4.input_activations.model_copy(update={"dynamic": True})
    scale, zp = compute_dynamic_scales_and_zp(value=x, args=args, module=None)
    expected = ct_fake_quantize(x, scale, zp, args)
    assert torch.equal(fp4.fake_quantize(x, "nvfp4", global_scale=f32(1.0))[0], expected)


# --- quantize / dequantize / fake_quantize consistency ---------------------------------------------


@pytest.mark.parametrize("hadamard_block", [None, 32, 128])
@pytest.mark.parametrize("fmt", tuple(GROUP_SIZE))
def test_fake_quantize_is_dequantize_of_quantize(fmt, hadamard_block):
    x = awkward(12, 256, seed=8)
    codes, scales, gs = fp4.quantize(x, fmt, hadamard_block=hadamard_block)
    q, _ = fp4.fake_quantize(x, fmt, hadamard_block=hadamard_block)
    dq = fp4.dequantize(codes, scales, fmt, global_scale=gs, hadamard_block=hadamard_block)
    assert torch.equal(q, dq)


@pytest.mark.parametrize("fmt", tuple(GROUP_SIZE))
def test_hadamard_quantizes_in_the_rotated_basis(fmt):
    x = randn(6, 128, seed=9)
    q, mask = fp4.fake_quantize(x, fmt, hadamard_block=64)
    rotated = hadamard_rotate(x, 64)
    q_rot, mask_rot = fp4.fake_quantize(rotated, fmt)
    assert torch.equal(mask, mask_rot)
    torch.testing.assert_close(q, hadamard_rotate(q_rot, 64), rtol=0, atol=1e-6 * float(x.abs().max()))
    assert torch.equal(fp4.quantize(x, fmt, hadamard_block=64)[0], fp4.quantize(rotated, fmt)[0])


def test_clip_mask_is_false_exactly_where_the_clamp_acted():
    # One MX group: amax 6.9 = 0b1.10111... x 2^2 -> mantissa < 1.75 -> scale 1, so 6.9 is clipped to 6;
    # 6.0 (on the grid's edge) and everything smaller are not.
    x = torch.zeros(1, 32)
    x[0, :4] = f32(6.9, -6.5, 6.0, -5.9)
    x[0, 4:] = torch.linspace(-3, 3, 28)
    q, mask = fp4.fake_quantize(x, "mxfp4")
    assert mask[0, :4].tolist() == [False, False, True, True] and mask[0, 4:].all()
    assert q[0, :4].tolist() == [6.0, -6.0, 6.0, -6.0]


def test_nvfp4_global_scale_can_be_given():
    x = randn(4, 32, seed=10)
    gs = f32(100.0)
    codes, scales, used = fp4.quantize(x, "nvfp4", global_scale=gs)
    assert torch.equal(used, gs)
    assert torch.equal(scales, fp4.nvfp4_group_scales(x.unflatten(-1, (2, 16)).abs().amax(-1), gs))
    step = (scales.float() / gs).unsqueeze(-1)
    assert torch.equal(codes, fp4.e2m1_codes(x.unflatten(-1, (2, 16)) / step).flatten(-2))


def test_bad_format_and_shape_are_one_line_errors():
    with pytest.raises(ValueError, match="choose one of"):
        fp4.quantize(torch.zeros(2, 32), "fp4")
    with pytest.raises(ValueError, match="multiple of the mxfp4 group size 32"):
        fp4.fake_quantize(torch.zeros(2, 48), "mxfp4")
    with pytest.raises(ValueError, match="global_scale"):
        fp4.effective_scales(torch.zeros(2, dtype=torch.float8_e4m3fn), "nvfp4")


# --- what stock transformers does with such a checkpoint --------------------------------------------


def write_fp4_checkpoint(model, directory, preset: str, input_global_scales: dict) -> None:
    """A compressed-tensors ``{mx,nv}fp4-pack-quantized`` checkpoint of ``model``, quantized by the twin."""
    import json

    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import save_file

    fmt = "mxfp4" if preset.startswith("MX") else "nvfp4"
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            codes, scales, gs = fp4.quantize(module.weight.detach(), fmt)
            del state[f"{name}.weight"]
            state[f"{name}.weight_packed"] = fp4.pack_fp4(codes)
            state[f"{name}.weight_scale"] = scales
            if gs is not None:
                state[f"{name}.weight_global_scale"] = gs
            if name in input_global_scales:
                state[f"{name}.input_global_scale"] = input_global_scales[name]
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    scheme = preset_name_to_scheme(preset, ["Linear"])
    scheme.format = f"{fmt}-pack-quantized"
    quantization = QuantizationConfig(
        config_groups={"group_0": scheme}, format=scheme.format, quantization_status="compressed", ignore=["lm_head"]
    )
    config = model.config.to_dict()
    config["quantization_config"] = json.loads(json.dumps(quantization.model_dump(), default=str))
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("preset", ["MXFP4", "NVFP4"])
def test_stock_transformers_serves_the_twins_rule_in_bf16(tmp_path, preset):
    """Loaded in bf16, the checkpoint's logits equal a bf16 model with ``Q(W)`` and the twin on the activations.

    Stock transformers decompresses FP4 weights into bf16 (``bf16(e2m1 * scale)``) and quantizes each
    linear's input with compressed-tensors' dynamic rule; NVFP4 uses the stored ``input_global_scale``.
    """
    from conftest import make_tiny_llama
    from transformers import AutoModelForCausalLM

    fmt = "mxfp4" if preset == "MXFP4" else "nvfp4"
    model = make_tiny_llama()
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    input_gs = {n: fp4.nvfp4_global_scale(f32(4.0 + i)) for i, n in enumerate(linears)} if fmt == "nvfp4" else {}
    write_fp4_checkpoint(model, tmp_path, preset, input_gs)
    served = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()

    # The reference: the same model with Q(W) as dense fp32 weights, loaded the same way (bf16), and the
    # twin on each quantized linear's input.
    for linear in linears.values():
        codes, scales, gs = fp4.quantize(linear.weight.detach(), fmt)
        linear.weight.data = fp4.dequantize(codes, scales, fmt, global_scale=gs)
    model.save_pretrained(tmp_path / "dense")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16).eval()
    for name in linears:
        g = input_gs.get(name)
        hook = lambda _, args, g=g: (fp4.fake_quantize(args[0], fmt, global_scale=g)[0],)  # noqa: E731
        reference.get_submodule(name).register_forward_pre_hook(hook)
    with torch.no_grad():
        assert torch.equal(served(tokens).logits, reference(tokens).logits)

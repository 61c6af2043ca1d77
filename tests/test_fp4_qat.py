"""FP4 QAT (``quantizer="mxfp4"`` / ``"nvfp4"``): config, QATLinear, the NVFP4 input scale, CAGE, export.

The grids themselves (E2M1 rounding, E8M0 / E4M3 scales, packing) are pinned against compressed-tensors
in ``tests/test_fp4.py``; here they are wired into training and export.

Tolerances, and why:
- hf-cage's own paths are exact (atol=0): QATLinear's forward is the twin on both operands, the export
  stores ``Q(W)`` bit for bit, ``load_quantized`` (float32) rebuilds the trained logits, and both the export's
  emulation of the stock loader and ``load_quantized(dtype=torch.bfloat16)`` compute what stock transformers
  computes (bf16), bit for bit.
- Stock transformers decompresses FP4 weights into bf16 and must compute in bf16 (float32 fails at the
  first forward), so against the float32-trained model its logits carry bf16 rounding: 8 significant bits
  per matmul, norm and residual, and with FP4 activations an input that bf16 moves across an E2M1 rounding
  threshold changes by a whole grid step. Measured here (logits of mean magnitude 0.25-0.31): weight-only
  max 0.007-0.009, mean 0.0012; W4A4 max 0.10-0.14, mean 0.012-0.014; loss within 1.2e-3 nats. Asserted
  with about 3x margin: weight-only max < 0.03, mean < 0.004; W4A4 max < 0.4, mean < 0.04; loss within
  5e-3. That the difference is bf16 compute and nothing else is the exact check above: the stock logits
  equal hf-cage's emulation (the trained model computed in bf16) bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import WIDE, make_tiny_llama, trained_checkpoint

from hf_cage import CAGE, QATLinear, QuantConfig, create_cage_optimizer, load_qat_model, quantize_model
from hf_cage.export import ExportError, export_checkpoint, export_model, load_quantized
from hf_cage.export.parity import sample_batch
from hf_cage.export.served import served_eval_many
from hf_cage.kernels import fp4
from hf_cage.kernels.fp4 import GROUP_SIZE as FP4_GROUP_SIZE
from hf_cage.kernels.spec import QuantSpec
from hf_cage.layers.fp4_linear import Fp4Linear
from hf_cage.optim import weight_quantizers_of


def f32(*values):
    return torch.tensor(values, dtype=torch.float32)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def fp4_layer(fmt: str, a_bits=4, in_features=64, out_features=32, seed=0, **quant) -> QATLinear:
    torch.manual_seed(seed)
    return QATLinear.from_linear(
        torch.nn.Linear(in_features, out_features), QuantConfig(quantizer=fmt, a_bits=a_bits, **quant)
    )


# --- QuantConfig ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", tuple(FP4_GROUP_SIZE))
def test_fp4_config_forces_the_formats_group_and_scale_rule(fmt):
    group = FP4_GROUP_SIZE[fmt]
    config = QuantConfig(quantizer=fmt)
    assert (config.w_bits, config.a_bits, config.granularity, config.group_size) == (4, 4, "group", group)
    assert config.hadamard is False and config.clip == "absmax" and config.a_clip == "absmax"
    assert config.weight_spec(64) == QuantSpec(4, fmt, "absmax", group, None)
    assert config.activation_spec(64) == QuantSpec(4, fmt, "absmax", group, None)  # per token and group
    assert QuantConfig(quantizer=fmt, a_bits=None).activation_spec(64) is None
    assert QuantConfig(quantizer=fmt, hadamard=True).weight_spec(96).hadamard_block == 32
    assert QuantConfig(quantizer=fmt, granularity="group", group_size=group).group_size == group
    assert QuantConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(quantizer="mxfp4", group_size=16, granularity="group"), "mxfp4 uses groups of 32"),
        (dict(quantizer="nvfp4", group_size=32, granularity="group"), "nvfp4 uses groups of 16"),
        (dict(quantizer="mxfp4", w_bits=8), "w_bits=8.*4-bit"),
        (dict(quantizer="nvfp4", a_bits=8), "a_bits=8.*4 or None"),
        (dict(quantizer="mxfp4", clip="mse"), "clip='mse' does not apply"),
        (dict(quantizer="nvfp4", a_clip="minmax"), "a_clip='minmax' does not apply"),
    ],
)
def test_fp4_config_conflicts_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_fp4_layers_need_whole_groups():
    with pytest.raises(ValueError, match="group"):
        QuantConfig(quantizer="mxfp4").weight_spec(48)


# --- QATLinear -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", tuple(FP4_GROUP_SIZE))
def test_qat_linear_fp4_is_the_twin_on_both_operands_with_the_clip_mask_backward(fmt):
    layer = fp4_layer(fmt).train()
    assert layer.kernel_plan.gemm is None  # FP4 never runs on the int W4A4 GEMM
    x = (randn(3, 5, 64, seed=1) * 3).requires_grad_()
    out = layer(x)
    gs = layer.input_global_scale if fmt == "nvfp4" else None
    if fmt == "nvfp4":  # calibrated on this batch: 448 * 6 / amax(x)
        assert torch.equal(gs, fp4.nvfp4_global_scale(x.detach().abs().amax()))
    qx, mask_x = fp4.fake_quantize(x.detach(), fmt, global_scale=gs)
    qw, mask_w = fp4.fake_quantize(layer.weight.detach(), fmt)
    assert torch.equal(out, F.linear(qx, qw, layer.bias))
    assert torch.equal(layer.weight_quantizer(), qw)
    g = randn(3, 5, 32, seed=2)
    out.backward(g)
    assert torch.equal(x.grad, (g @ qw) * mask_x)
    assert torch.equal(layer.weight.grad, (g.reshape(-1, 32).T @ qx.reshape(-1, 64)) * mask_w)


@pytest.mark.parametrize("fmt", tuple(FP4_GROUP_SIZE))
@pytest.mark.parametrize("hadamard", [False, True])
def test_fp4_linear_packs_a_trained_layer_and_computes_its_forward(fmt, hadamard):
    layer = fp4_layer(fmt, hadamard=hadamard).train()
    x = randn(6, 64, seed=4) * 2
    layer(x)  # calibrates an NVFP4 input scale
    layer.eval()
    packed = Fp4Linear.from_qat_linear(layer)
    assert packed.weight_packed.dtype == torch.uint8 and packed.weight_packed.shape == (32, 32)
    assert torch.equal(packed.dequantized_weight(), layer.weight_quantizer())
    with torch.no_grad():
        assert torch.equal(packed(x), layer(x))
    with pytest.raises(ValueError, match="weight_scale"):
        packed.load_packed({"weight_scale": torch.zeros(32, 2)})


def test_nvfp4_input_global_scale_is_a_running_calibration_frozen_in_eval(tmp_path):
    """The static_minmax rule: the running max of |input| over training batches, stored as 448 * 6 / amax."""
    layer = fp4_layer("nvfp4")
    assert layer.input_global_scale.tolist() == [0.0]  # not calibrated yet
    x = randn(4, 64, seed=3)
    amax = x.abs().amax()
    layer.train()
    layer(x)
    assert torch.equal(layer.input_global_scale, fp4.nvfp4_global_scale(amax))
    layer(x * 0.5)  # smaller batch: the running max stays
    assert torch.equal(layer.input_global_scale, fp4.nvfp4_global_scale(amax))
    layer(x * 3)  # larger: it grows
    assert torch.equal(layer.input_global_scale, fp4.nvfp4_global_scale(3 * amax))
    layer.eval()
    layer(x * 10)  # frozen in eval
    assert torch.equal(layer.input_global_scale, fp4.nvfp4_global_scale(3 * amax))
    fresh = fp4_layer("nvfp4").eval()
    fresh(x)  # an uncalibrated layer is calibrated by its first forward, also in eval
    assert torch.equal(fresh.input_global_scale, fp4.nvfp4_global_scale(amax))
    assert "input_global_scale" in layer.state_dict()
    assert not hasattr(fp4_layer("mxfp4"), "input_global_scale")  # MXFP4 activations are fully dynamic
    assert not hasattr(fp4_layer("nvfp4", a_bits=None), "input_global_scale")


# --- CAGE ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", tuple(FP4_GROUP_SIZE))
def test_cage_step_pulls_toward_the_fp4_grid(fmt):
    """One decoupled CAGE step is the AdamW step plus ``-lr * lambda * (W - Q(W))`` with the FP4 ``Q``."""
    model = quantize_model(make_tiny_llama(0), QuantConfig(quantizer=fmt))
    reference = quantize_model(make_tiny_llama(0), QuantConfig(quantizer=fmt))
    for m in (model, reference):
        for i, p in enumerate(m.parameters()):
            p.grad = randn(*p.shape, seed=100 + i) * 1e-2
    lr, lam = 1e-2, 5.0
    opt = CAGE(model.parameters(), lr=lr, cage_lambda=lam, cage_silence_ratio=0.0, cage_schedule="constant",
               total_steps=10, weight_quantizers=weight_quantizers_of(model))  # fmt: skip
    opt.step()
    torch.optim.AdamW(reference.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0).step()
    checked = 0
    for name, layer in reference.named_modules():
        if isinstance(layer, QATLinear):
            w_adam = layer.weight.detach()
            expected = w_adam - lr * lam * (w_adam - fp4.fake_quantize(w_adam, fmt)[0])
            torch.testing.assert_close(model.get_submodule(name).weight.detach(), expected, atol=1e-7, rtol=1e-6)
            checked += 1
    assert checked == 14


@pytest.mark.parametrize("fmt", tuple(FP4_GROUP_SIZE))
def test_short_qat_cage_run_trains_an_fp4_model(fmt):
    model = quantize_model(make_tiny_llama(1), QuantConfig(quantizer=fmt))
    opt = create_cage_optimizer(model, lr=3e-3, cage_lambda=10.0, cage_silence_ratio=0.5, total_steps=8)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses
    assert opt.param_groups[0]["cage_step"] == 8


def test_cage_config_accepts_the_fp4_quantizers(tmp_path):
    from hf_cage import CAGEConfig

    args = CAGEConfig(output_dir=str(tmp_path), quant_quantizer="nvfp4", use_cpu=True, report_to="none")
    assert args.quant_config() == QuantConfig(quantizer="nvfp4")


# --- export --------------------------------------------------------------------------------------

CASES = {
    "mxfp4-w4a4": dict(quantizer="mxfp4"),
    "mxfp4-w4a16": dict(quantizer="mxfp4", a_bits=None),
    "nvfp4-w4a4": dict(quantizer="nvfp4"),
    "nvfp4-w4a16": dict(quantizer="nvfp4", a_bits=None),
}


def test_fp4_exports_with_defaults_serve_as_trained_in_stock_transformers(tmp_path):
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    batch = sample_batch(make_tiny_llama(0, **WIDE))  # the batch the export's own parity measurement uses
    trained, results, in_bf16, exports = {}, {}, {}, []
    for seed, (name, quant) in enumerate(CASES.items()):
        run = tmp_path / "runs" / name
        model = trained_checkpoint(run, seed, **quant)
        with torch.no_grad():
            trained[name] = model(input_ids=batch, labels=batch)
            # the checkpoint as reloaded is the trained model, bit for bit (NVFP4: input_global_scale included)
            assert torch.equal(load_qat_model(run)(input_ids=batch).logits, trained[name].logits)
        result = export_checkpoint(run, tmp_path / "exports" / name, progress=False, log=None)
        fmt = quant["quantizer"]
        assert result.format == f"{fmt}-pack-quantized" and result.parity["compute_dtype"] == "bfloat16"
        config = json.loads((tmp_path / "exports" / name / "config.json").read_text())
        preset = fmt.upper() + ("" if quant.get("a_bits", 4) else "A16")
        scheme = preset_name_to_scheme(preset, ["Linear"]).model_dump(mode="json")
        group = config["quantization_config"]["config_groups"]["group_0"]
        assert config["quantization_config"]["format"] == result.format == group.pop("format")
        assert group == {k: v for k, v in scheme.items() if k != "format"}
        # load_quantized (float32) rebuilds the trained model exactly
        loaded = load_quantized(tmp_path / "exports" / name)
        assert all(isinstance(loaded.get_submodule(n), Fp4Linear) for n, m in model.named_modules()
                   if isinstance(m, QATLinear))  # fmt: skip
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=batch).logits, trained[name].logits), name
            in_bf16[name] = load_quantized(tmp_path / "exports" / name, dtype=torch.bfloat16)(input_ids=batch).logits
        results[name] = result
        exports.append(tmp_path / "exports" / name)

    served = served_eval_many(exports, batch, logits=True, loss=True)
    for (name, reference), stock in zip(trained.items(), served):
        diff = (stock.logits - reference.logits).abs()
        # hf-cage's emulation of the stock loader (bf16) is what stock transformers computed, bit for bit, and so
        # is load_quantized in bf16
        assert torch.equal(stock.logits, in_bf16[name].float()), name
        assert diff.max().item() == results[name].parity["logit_max_abs_diff"], name
        assert diff.mean().item() == pytest.approx(results[name].parity["logit_mean_abs_diff"], rel=1e-6), name
        # against the float32-trained model: bf16 compute (see the module docstring)
        bound_max, bound_mean = (0.4, 0.04) if name.endswith("w4a4") else (0.03, 0.004)
        assert 0 < diff.max().item() < bound_max and diff.mean().item() < bound_mean, (name, diff.max(), diff.mean())
        assert stock.loss == pytest.approx(reference.loss.item(), abs=5e-3), name


def test_fp4_format_choice_and_refusals(tmp_path):
    def trained(**quant):
        model = quantize_model(make_tiny_llama(0), QuantConfig(**quant))
        model.train()
        with torch.no_grad():
            model(input_ids=torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)))
        return model.eval()

    mx = trained(quantizer="mxfp4")
    with pytest.raises(ExportError, match="mxfp4 grid is exported with --format mxfp4-pack-quantized"):
        export_model(mx, tmp_path / "a", format="compressed-tensors", progress=False, log=None)
    with pytest.raises(ExportError, match="holds the nvfp4 grid; .*quantizer='mxfp4'"):
        export_model(mx, tmp_path / "a", format="nvfp4-pack-quantized", progress=False, log=None)
    with pytest.raises(ExportError, match="holds the mxfp4 grid; .*quantizer='int'"):
        export_model(trained(quantizer="int"), tmp_path / "a", format="mxfp4-pack-quantized", progress=False, log=None)
    uncalibrated = quantize_model(make_tiny_llama(0), QuantConfig(quantizer="nvfp4"))
    with pytest.raises(ExportError, match="input_global_scale was never calibrated"):
        export_model(uncalibrated, tmp_path / "a", progress=False, log=None)
    assert not (tmp_path / "a").exists()

    # weights only: NVFP4A16, no input scale stored, load_quantized serves what stock loaders serve
    nv = trained(quantizer="nvfp4")
    export_model(nv, tmp_path / "w", weights_only=True, progress=False, log=None)
    from safetensors.torch import load_file

    assert not any(k.endswith("input_global_scale") for k in load_file(tmp_path / "w" / "model.safetensors"))
    assert json.loads((tmp_path / "w" / "config.json").read_text())["hf_cage_quantization"]["a_bits"] is None

    # Hadamard: stock loaders apply no rotation, so auto picks the hf-cage format, which load_quantized reads exactly
    notes = []
    rotated = trained(quantizer="nvfp4", hadamard=True)
    result = export_model(rotated, tmp_path / "h", progress=False, log=notes.append)
    assert result.format == "hf-cage" and result.parity["logit_max_abs_diff"] == 0
    assert "nvfp4-pack-quantized --allow-lossy" in notes[0]
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "h")(input_ids=ids).logits, rotated(input_ids=ids).logits)
    card = (tmp_path / "h" / "README.md").read_text()
    assert "NVFP4 grid with Hadamard rotations" in card

    export_model(mx, tmp_path / "m", progress=False, log=None)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "mxfp4-pack-quantized" in card and "Blackwell" in card and "Marlin" in card and "bfloat16" in card
    assert "- mxfp4\n" in card and "- int4\n" not in card and "| Weights | 4-bit, MXFP4 (E2M1 values" in card

"""The CAGE correction: AdamW equivalence, the update by hand, silence, resume semantics, any optimizer, GradScaler,
the weight-decay policy, bf16 warning, toy case."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import make_tiny_llama

from hf_cage import CAGE, CAGECorrection, QuantConfig, create_cage_optimizer, quantize_model, weight_quantizers_of
from hf_cage.layers import QATLinear

CONFIG = QuantConfig(w_bits=4, a_bits=4)


def quantized_llama(seed: int = 0):
    return quantize_model(make_tiny_llama(seed), CONFIG).train()


def fake_grads(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 0.1


def assert_same(a, b):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, atol=0, rtol=0, msg=name)


@pytest.fixture
def quantizer_calls(monkeypatch):
    """Counts calls of ``QATLinear.weight_quantizer`` (the correction's ``Q``)."""
    calls = []
    original = QATLinear.weight_quantizer

    def counted(self, weight=None):
        calls.append(1)
        return original(self, weight)

    monkeypatch.setattr(QATLinear, "weight_quantizer", counted)
    return calls


def test_lambda_zero_equals_adamw_after_20_steps(token_batch, quantizer_calls):
    model = quantized_llama()
    reference = copy.deepcopy(model)
    cage = create_cage_optimizer(model, lr=3e-3, weight_decay=0.1, cage_lambda=0.0)
    groups = [{"params": list(g["params"]), "weight_decay": g["weight_decay"]} for g in cage.param_groups]
    ref_params = dict(zip(map(id, model.parameters()), reference.parameters()))
    groups = [{**g, "params": [ref_params[id(p)] for p in g["params"]]} for g in groups]
    adamw = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(20):
        for m, opt in ((model, cage), (reference, adamw)):
            m(token_batch, labels=token_batch).loss.backward()
            opt.step()
            opt.zero_grad()
    assert_same(model, reference)
    assert quantizer_calls == []
    assert cage.param_groups[0]["cage_step"] == 20


def test_decoupled_step_by_hand():
    model = quantized_llama()
    reference = copy.deepcopy(model)
    fake_grads(model, 1)
    fake_grads(reference, 1)
    lr, lam = 1e-2, 5.0
    opt = CAGE(
        model.parameters(),
        lr=lr,
        cage_lambda=lam,
        cage_silence_ratio=0.0,
        cage_schedule="constant",
        total_steps=10,
        weight_quantizers=weight_quantizers_of(model),
    )
    opt.step()
    torch.optim.AdamW(reference.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0).step()
    quantized = {name for name, m in reference.named_modules() if isinstance(m, QATLinear)}
    checked = 0
    for (name, w_new), w_adam in zip(model.named_parameters(), reference.parameters()):
        module = name.rpartition(".")[0]
        if module in quantized and name.endswith("weight"):
            q = reference.get_submodule(module).weight_quantizer(w_adam)
            expected = w_adam - lr * lam * (w_adam - q)
            torch.testing.assert_close(w_new, expected, atol=1e-7, rtol=1e-6)
            assert not torch.equal(w_new, w_adam)
            checked += 1
        else:
            torch.testing.assert_close(w_new, w_adam, atol=0, rtol=0, msg=name)
    assert checked == 14


def test_coupled_step_by_hand():
    model = quantized_llama()
    reference = copy.deepcopy(model)
    fake_grads(model, 2)
    fake_grads(reference, 2)
    lam = 2.0
    for _, layer in [(n, m) for n, m in reference.named_modules() if isinstance(m, QATLinear)]:
        layer.weight.grad += lam * (layer.weight - layer.weight_quantizer())
    opt = create_cage_optimizer(
        model, lr=1e-2, cage_lambda=lam, cage_silence_ratio=0.0, cage_schedule="constant", cage_variant="coupled"
    )
    opt.step()
    torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0).step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6, msg=name)


def test_quantizer_never_called_in_silence(quantizer_calls):
    model = quantized_llama()
    opt = create_cage_optimizer(model, lr=1e-3, cage_lambda=10.0, cage_silence_ratio=0.8, total_steps=10)
    calls = quantizer_calls
    per_step, lambdas = [], []
    for step in range(10):
        fake_grads(model, step)
        lambdas.append(opt.next_lambda())
        before = len(calls)
        opt.step()
        per_step.append(len(calls) - before)
    assert per_step == [0] * 8 + [14, 14]
    assert lambdas == pytest.approx([0.0] * 8 + [5.0, 10.0])


def test_lr_schedule_scales_the_correction():
    model = quantized_llama()
    reference = copy.deepcopy(model)
    kwargs = dict(lr=1e-2, cage_lambda=3.0, cage_silence_ratio=0.0, cage_schedule="constant")
    opt = create_cage_optimizer(model, **kwargs)
    opt_ref = create_cage_optimizer(reference, **{**kwargs, "lr": 5e-3})
    for g in opt.param_groups:
        g["lr"] = 5e-3  # what an LR scheduler does
    fake_grads(model, 3)
    fake_grads(reference, 3)
    opt.step()
    opt_ref.step()
    assert_same(model, reference)


def _run(model, opt, steps, seed0):
    for step in range(steps):
        fake_grads(model, seed0 + step)
        opt.step()


def test_state_dict_round_trip_continues_exactly():
    kwargs = dict(lr=1e-2, cage_lambda=10.0, cage_silence_ratio=0.5, total_steps=6)
    model = quantized_llama()
    opt = create_cage_optimizer(model, **kwargs)
    _run(model, opt, 3, 0)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # plain data only: pickles
    resumed_model = copy.deepcopy(model)
    resumed = create_cage_optimizer(resumed_model, **kwargs)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert [g["cage_step"] for g in resumed.param_groups] == [3, 3]
    _run(model, opt, 3, 3)
    _run(resumed_model, resumed, 3, 3)
    assert_same(model, resumed_model)


def test_resume_keeps_new_cage_hyperparameters_to_branch_a_run(quantizer_calls):
    """An STE checkpoint at the end of silence, resumed with cage_lambda=10, continues as CAGE."""
    model = quantized_llama()
    ste = create_cage_optimizer(model, lr=1e-2, cage_lambda=0.0, cage_silence_ratio=0.8, total_steps=10)
    _run(model, ste, 8, 0)
    branch = create_cage_optimizer(model, lr=1e-2, cage_lambda=10.0, cage_silence_ratio=0.8, total_steps=10)
    branch.load_state_dict(ste.state_dict())
    assert branch.correction.cage_lambda == 10.0 and "cage_lambda" not in branch.state_dict()["param_groups"][0]
    assert branch.param_groups[0]["cage_step"] == 8
    assert branch.next_lambda() == pytest.approx(5.0)
    _run(model, branch, 1, 8)
    assert len(quantizer_calls) == 14


def test_step_counter_inferred_from_a_plain_adamw_state():
    model = quantized_llama()
    groups = [{"params": g["params"]} for g in create_cage_optimizer(model, cage_lambda=0.0).param_groups]
    adamw = torch.optim.AdamW(groups, lr=1e-2)
    fake_grads(model, 0)
    adamw.step()
    adamw.step()
    opt = create_cage_optimizer(model, lr=1e-2, cage_lambda=10.0, total_steps=10)
    opt.load_state_dict(adamw.state_dict())
    assert [g["cage_step"] for g in opt.param_groups] == [2, 2]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(cage_lambda=-1.0), "cage_lambda"),
        (dict(cage_silence_ratio=1.0), "cage_silence_ratio"),
        (dict(cage_silence_ratio=-0.5), "cage_silence_ratio"),
        (dict(cage_schedule="cosine"), "cage_schedule"),
        (dict(cage_variant="fused"), "cage_variant"),
        (dict(total_steps=0), "total_steps"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_field(kwargs, field):
    model = quantized_llama()
    with pytest.raises(ValueError, match=field):
        create_cage_optimizer(model, **{"total_steps": 10, **kwargs})
    with pytest.raises(ValueError, match=field):
        CAGECorrection(torch.optim.SGD(model.parameters(), lr=0.1), model, **{"total_steps": 10, **kwargs})


def test_cage_needs_total_steps_for_a_scheduled_lambda():
    model = quantized_llama()
    opt = create_cage_optimizer(model, cage_lambda=10.0)  # total_steps may come later (CAGETrainer: start_run)
    fake_grads(model, 0)
    with pytest.raises(ValueError, match="total_steps"):
        opt.step()
    opt.correction.start_run(4)
    opt.step()
    assert opt.correction.steps_taken == 1


def test_cage_without_quantizers_refuses_a_positive_lambda():
    with pytest.raises(ValueError, match="create_cage_optimizer"):
        CAGE([torch.nn.Parameter(torch.zeros(2, 2))], total_steps=10)


def test_factory_groups_follow_the_one_decay_policy():
    """Weight decay on the quantized block linears only (the CAGE reference); never lm_head, embeddings, norms."""
    model = quantized_llama()
    assert not model.config.tie_word_embeddings
    opt = create_cage_optimizer(model, lr=1e-3, weight_decay=0.1, cage_lambda=0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: (g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in opt.param_groups}
    quantized = sorted(f"{n}.weight" for n, m in model.named_modules() if isinstance(m, QATLinear))
    assert groups["decay"] == (0.1, quantized)
    assert groups["no_decay"][0] == 0.0
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= set(groups["no_decay"][1])
    assert len(quantized) + len(groups["no_decay"][1]) == len(names)
    with pytest.raises(ValueError, match="quantize_model"):
        create_cage_optimizer(make_tiny_llama())


def test_frozen_quantized_weights_are_left_out():
    model = quantized_llama()
    frozen = model.model.layers[0].self_attn.q_proj.weight
    frozen.requires_grad_(False)
    before = frozen.clone()
    opt = create_cage_optimizer(model, cage_lambda=5.0, cage_silence_ratio=0.0, total_steps=2)
    assert frozen not in opt.correction.weight_quantizers and len(opt.correction.weight_quantizers) == 13
    wrapper = CAGECorrection(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), model)
    assert len(wrapper.weight_quantizers) == 13
    fake_grads(model, 0)
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, before)


def test_correction_on_sgd_by_hand(quantizer_calls):
    model = quantized_llama()
    reference = copy.deepcopy(model)
    lr, lam = 0.05, 4.0
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    correction = CAGECorrection(opt, model, cage_lambda=lam, cage_silence_ratio=0.5, total_steps=2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ref_sgd = torch.optim.SGD(reference.parameters(), lr=lr, momentum=0.9)
    calls = quantizer_calls
    for step in range(2):
        fake_grads(model, step)
        fake_grads(reference, step)
        opt.step()
        scheduler.step()
        ref_sgd.step()
        if step == 0:  # silence: plain SGD, no quantizer call
            assert_same(model, reference)
            assert calls == []
    for (name, w), m_ref in zip(model.named_parameters(), reference.parameters()):
        module = name.rpartition(".")[0]
        layer = reference.get_submodule(module) if module else None
        if isinstance(layer, QATLinear) and name.endswith("weight"):
            expected = m_ref - lr * lam * (m_ref - layer.weight_quantizer(m_ref))
            torch.testing.assert_close(w, expected, atol=1e-7, rtol=1e-6)
        else:
            torch.testing.assert_close(w, m_ref, atol=0, rtol=0)
    state = opt.state_dict()
    assert state["param_groups"][0]["cage_step"] == 2 and correction.steps_taken == 2
    with pytest.raises(ValueError, match="already"):
        CAGECorrection(opt, model, total_steps=2)
    correction.remove()
    before = [p.clone() for p in model.parameters()]
    fake_grads(model, 7)
    opt.step()  # detached: plain SGD, the counter stays
    assert state["param_groups"][0]["cage_step"] == 2 and opt.param_groups[0]["cage_step"] == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_coupled_correction_on_plain_sgd_by_hand():
    model = quantized_llama()
    reference = copy.deepcopy(model)
    lr, lam = 0.1, 3.0
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    CAGECorrection(opt, model, cage_lambda=lam, cage_silence_ratio=0.0, cage_schedule="constant",
                   cage_variant="coupled", total_steps=1)  # fmt: skip
    fake_grads(model, 4)
    fake_grads(reference, 4)
    opt.step()
    layers = dict(quantized_layers_of(reference))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            layer = layers.get(name.removesuffix(".weight"))
            grad = p.grad
            if layer is not None and name.endswith("weight"):
                grad = grad + lam * (p - layer.weight_quantizer(p))
            p -= lr * grad
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6, msg=name)


def quantized_layers_of(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QATLinear)]


def test_cage_hands_its_arguments_to_adamw_and_the_correction():
    """CAGE is AdamW + CAGECorrection (the update itself is checked against the hand-written loops above):
    what it must get right is passing each argument on, and its own defaults."""
    model = quantized_llama()
    opt = CAGE(model.parameters(), lr=2e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, cage_lambda=6.0,
               cage_silence_ratio=0.25, cage_schedule="constant", cage_variant="coupled", total_steps=8,
               model=model)  # fmt: skip
    assert isinstance(opt, torch.optim.AdamW)
    assert {k: opt.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")} == dict(
        lr=2e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1
    )
    c = opt.correction
    assert c.optimizer is opt and c.model is model
    assert (c.cage_lambda, c.cage_silence_ratio, c.cage_schedule, c.cage_variant, c.total_steps) == (
        6.0, 0.25, "constant", "coupled", 8
    )  # fmt: skip
    assert [opt.lambda_at(t) for t in range(1, 9)] == [0.0, 0.0, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0]
    other = quantized_llama()
    default = CAGE(other.parameters(), model=other)
    assert (default.defaults["betas"], default.defaults["weight_decay"]) == ((0.9, 0.95), 0.0)
    assert (default.correction.cage_lambda, default.correction.cage_silence_ratio) == (10.0, 0.8)
    assert (default.correction.cage_schedule, default.correction.cage_variant) == ("linear_ramp", "decoupled")


@pytest.mark.parametrize("variant", ["decoupled", "coupled"])
def test_fused_adamw_under_grad_scaler_matches_foreach_and_skips_overflowed_steps(variant):
    """GradScaler hands a fused optimizer still-scaled gradients and a found_inf flag instead of skipping it.

    The correction must see unscaled values and a skipped step must neither pull nor advance the schedule.
    Step 2 overflows (an inf gradient); fused and foreach runs then agree to fp32 rounding.
    """
    kwargs = dict(cage_lambda=20.0, cage_silence_ratio=0.0, total_steps=4, cage_variant=variant)
    runs = {}
    for fused in (False, True):
        model = quantized_llama()
        opt = create_cage_optimizer(model, lr=1e-2, fused=fused, foreach=not fused, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        weights = []
        for step in range(4):
            fake_grads(model, step)
            scale = scaler.scale(torch.ones(()))  # what backward of scaler.scale(loss) would produce
            for p in model.parameters():
                p.grad.mul_(scale)
            if step == 1:
                model.model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            weights.append(model.model.layers[0].self_attn.q_proj.weight.detach().clone())
        assert torch.equal(weights[0], weights[1])  # the overflowed step moved nothing
        assert opt.correction.steps_taken == 3
        runs[fused] = model
    for (name, a), b in zip(runs[False].named_parameters(), runs[True].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_master_weights_warn():
    model = quantized_llama().to(torch.bfloat16)
    with pytest.warns(UserWarning, match="bfloat16.*fp32 master weights"):
        create_cage_optimizer(model, total_steps=4)
    fp32 = quantized_llama()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_cage_optimizer(fp32, total_steps=4)
        create_cage_optimizer(quantized_llama().to(torch.bfloat16), cage_lambda=0.0)  # STE: nothing to lose


def test_start_run_restarts_the_schedule_of_a_new_run():
    model = quantized_llama()
    opt = create_cage_optimizer(model, cage_lambda=8.0, cage_silence_ratio=0.5, total_steps=2)
    _run(model, opt, 2, 0)
    assert opt.correction.lambda_at(opt.correction.steps_taken) == 8.0
    opt.correction.start_run(8)
    lambdas = []
    for step in range(8):
        lambdas.append(opt.next_lambda())
        _run(model, opt, 1, step)
    assert lambdas == [0.0] * 4 + [2.0, 4.0, 6.0, 8.0]


def _toy_quantized_loss(cage_lambda: float, seed: int) -> float:
    """Least squares ``min ||X W^T - Y||`` with a 3-bit weight quantizer; returns the loss at ``Q(W)``."""
    gen = torch.Generator().manual_seed(seed)
    d, m, n, steps = 64, 16, 512, 400
    x = torch.randn(n, d, generator=gen) * torch.logspace(0, -1, d)  # ill-conditioned: curvature matters
    w_star = torch.randn(m, d, generator=gen)
    y = x @ w_star.T
    layer = QATLinear(d, m, bias=False, quant_config=QuantConfig(w_bits=3, a_bits=None, hadamard=False))
    with torch.no_grad():
        layer.weight.copy_(w_star + 0.3 * torch.randn(m, d, generator=gen))
    opt = CAGE(
        layer.parameters(),
        lr=3e-3,
        cage_lambda=cage_lambda,
        cage_silence_ratio=0.0,
        total_steps=steps,
        weight_quantizers=weight_quantizers_of(torch.nn.Sequential(layer)),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(steps):
        loss = (layer(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheduler.step()
    with torch.no_grad():
        return (x @ layer.weight_quantizer().T - y).square().mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_cage_beats_ste_on_toy_least_squares(seed):
    ste, cage = _toy_quantized_loss(0.0, seed), _toy_quantized_loss(3.0, seed)
    assert cage < 0.97 * ste, (cage, ste)


def test_optimizer_step_benchmark_quick_mode(tmp_path, import_benchmark):
    import json

    bench = import_benchmark("optimizer_step")
    out = tmp_path / "result.json"
    results = bench.main(["--quick", "--trials", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == results
    assert sorted(results["runs"]) == ["int_w4", "quest_w4a4"]
    for run in results["runs"].values():
        assert sorted(run["median_s"]) == ["adamw_foreach", "cage_active", "cage_silence"]
        assert all(t > 0 for t in run["median_s"].values())
        assert run["active_ratio"] == run["median_s"]["cage_active"] / run["median_s"]["adamw_foreach"]


def test_train_step_benchmark_quick_mode(tmp_path, import_benchmark):
    import json

    bench = import_benchmark("train_step")
    out = tmp_path / "result.json"
    results = bench.main(["--quick", "--trials", "1", "--quantizer", "int_w4a4", "--json", str(out)])
    assert json.loads(out.read_text()) == results
    assert sorted(results["median_s"]) == ["bf16", "int_w4a4/cage_active", "int_w4a4/cage_silence", "int_w4a4/ste"]
    run = results["runs"]["int_w4a4"]
    assert run["active_over_ste"] == results["median_s"]["int_w4a4/cage_active"] / results["median_s"]["int_w4a4/ste"]
    assert run["ste_over_bf16"] > 0


def test_coupled_variant_refuses_a_closure_and_decoupled_takes_one():
    model = quantized_llama()
    kwargs = dict(cage_lambda=2.0, cage_silence_ratio=0.0, cage_schedule="constant", total_steps=2)

    def closure():
        fake_grads(model, 0)
        return torch.zeros(())

    coupled = create_cage_optimizer(model, cage_variant="coupled", **kwargs)
    fake_grads(model, 0)
    with pytest.raises(ValueError, match="closure"):
        coupled.step(closure)
    coupled.step(None)  # no closure: fine
    coupled.correction.remove()
    decoupled = torch.optim.SGD(model.parameters(), lr=0.1)
    CAGECorrection(decoupled, model, **kwargs)
    assert decoupled.step(closure) is not None and decoupled.param_groups[0]["cage_step"] == 1

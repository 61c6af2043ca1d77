"""The accuracy benchmark in seconds: product-path runs, paired CAGE branches, the report it writes."""

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def accuracy(import_benchmark):
    return import_benchmark("accuracy_study")


@pytest.fixture(scope="module")
def quick_results(accuracy, tmp_path_factory):
    """Every run of the quick plan (pretraining, fine-tuning from the BF16 run), a quick map point and MXFP4 runs of
    the formats study, in-process."""
    out = tmp_path_factory.mktemp("accuracy")
    results = out / "results"
    specs = accuracy.quick_plan()
    base = accuracy.Spec("map", "bf16", 0, **accuracy.QUICK)
    ste = replace(base, method="ste", w_bits=4, a_bits=4)
    specs += [base, ste, replace(ste, method="cage", lam=10.0, silence=0.5)]
    fp4 = accuracy.Spec("formats", "ste", 0, w_bits=4, a_bits=4, quantizer="mxfp4", **accuracy.QUICK)
    fp4_ft = replace(fp4, init=accuracy.quick_plan()[0].key, steps=8, lr=1e-3, data_seed=7)
    specs += [fp4, replace(fp4, method="cage", lam=10.0, silence=0.5), fp4_ft]
    specs += [s for s in quick_practical(accuracy) if s.pull in (None, 0.4)]
    for spec in specs:
        accuracy.append_result(results, accuracy.train(spec, out))
    return out, accuracy.load_results(results)


def quick_practical(accuracy):
    """The practical study's fine-tuning runs on the quick BF16 model: 10 steps, weight-only int4 in groups of 32."""
    fmt = (4, None, "int", 32)
    plan = accuracy.plan_practical({}, 1, base=accuracy.quick_plan()[0], steps=10, sweep_format=fmt, formats=(fmt,))
    return [s for s in plan[1:] if s.steps == 10 and s.silence != accuracy.PRACTICAL_SILENCE_DEFAULT]


def test_runs_go_through_the_trainer_and_cage_branches_at_the_end_of_silence(accuracy, quick_results):
    out, done = quick_results
    ste = accuracy.Spec("pretrain", "ste", 0, w_bits=4, a_bits=4, **accuracy.QUICK)
    cage = replace(ste, method="cage", lam=10.0, silence=0.5)
    assert done[cage.key]["steps_trained"] == accuracy.QUICK["steps"] // 2
    assert (accuracy.checkpoint_dir(out, ste, cage.branch_step) / "trainer_state.json").is_file()
    assert done[cage.key]["final_weights_sha"] != done[ste.key]["final_weights_sha"]  # lambda 10 moved the weights
    # the fine-tuning runs start from the saved BF16 model
    finetune = [r for r in done.values() if r["study"] == "finetune"]
    assert len(finetune) == 3 and all(r["init"] == accuracy.quick_plan()[0].key for r in finetune)


def test_a_lambda_zero_branch_reproduces_the_ste_run_to_the_bit(accuracy, quick_results, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out, _ = quick_results
    ste = accuracy.Spec("pretrain", "ste", 0, w_bits=4, a_bits=4, save=True, **accuracy.QUICK)
    full = accuracy.train(ste, tmp_path)
    branch = accuracy.train(replace(ste, method="cage", lam=0.0, silence=0.5), tmp_path)
    assert branch["steps_trained"] == ste.steps - ste.steps // 2
    assert branch["eval_loss"] == full["eval_loss"]
    assert branch["final_weights_sha"] == full["final_weights_sha"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / ste.key).state_dict()
    b = AutoModelForCausalLM.from_pretrained(
        tmp_path / "models" / replace(ste, method="cage", lam=0.0, silence=0.5).key
    ).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)


def test_report_write_docs_writes_the_tables_and_the_plot(accuracy, quick_results, tmp_path, capsys):
    out, done = quick_results
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text(
        "# Results\n\nhand-written text\n\n<!-- pretrain-table -->\nold\n<!-- pretrain-table -->\n"
    )
    results = out / "results"
    assert accuracy.main(["report", "--results", str(results), "--docs", str(docs), "--write-docs"]) == 0
    text = (docs / "results.md").read_text()
    assert text.startswith("# Results\n\nhand-written text\n") and "\nold\n" not in text
    for name in (
        "practical",
        "practical-sweep",
        "pretrain",
        "finetune",
        "map",
        "formats-pretrain",
        "formats-finetune",
    ):
        assert text.count(f"<!-- {name}-table -->") == 2
    # the written shares are the paired arithmetic of the results file
    ste = accuracy.Spec("pretrain", "ste", 0, w_bits=4, a_bits=4, **accuracy.QUICK)
    cage = replace(ste, method="cage", lam=10.0, silence=0.5)
    bf16 = accuracy.Spec("pretrain", "bf16", 0, **accuracy.QUICK)
    share = accuracy.gap_closed(done[ste.key]["eval_loss"], done[cage.key]["eval_loss"], done[bf16.key]["eval_loss"])
    row = next(line for line in text.splitlines() if line.startswith("| CAGE lambda 10, silence 0.5 | w4a4-quest | 1"))
    assert accuracy.share_cell([share]) in row and f"{done[cage.key]['eval_loss']:.4f}" in row
    ft_ste = replace(ste, study="finetune", init=bf16.key, steps=8, lr=1e-3, data_seed=7)
    ft_bf16 = replace(bf16, study="finetune", init=bf16.key, steps=8, lr=1e-3, data_seed=7)
    increase = done[ft_ste.key]["eval_loss"] - done[ft_bf16.key]["eval_loss"]
    row = next(line for line in text.splitlines() if re.match(r"\| w4a4-quest \| STE \| 1 \|", line))
    assert f"{increase:+.4f}" in row
    # the formats tables put MXFP4 beside pretrain's QuEST and BF16 rows, paired with the same BF16 seed
    formats = text.split("<!-- formats-pretrain-table -->")[1]
    fp4 = accuracy.Spec("formats", "ste", 0, w_bits=4, a_bits=4, quantizer="mxfp4", **accuracy.QUICK)
    fp4_cage = replace(fp4, method="cage", lam=10.0, silence=0.5)
    share = accuracy.gap_closed(
        done[fp4.key]["eval_loss"], done[fp4_cage.key]["eval_loss"], done[bf16.key]["eval_loss"]
    )
    row = next(
        line for line in formats.splitlines() if line.startswith("| CAGE lambda 10, silence 0.5 | w4a4-mxfp4 |")
    )
    assert accuracy.share_cell([share]) in row
    assert "| STE | w4a4-quest | 1 |" in formats and "| BF16 | - | 1 |" in formats
    formats_ft = text.split("<!-- formats-finetune-table -->")[1]
    assert re.search(r"\| w4a4-mxfp4 \| STE \| 1 \|", formats_ft) and "| BF16 | fine-tuned | 1 |" in formats_ft
    assert (docs / "regime_map.png").stat().st_size > 1000
    assert "## pretrain" in capsys.readouterr().out


def test_report_without_results_is_one_line_and_exit_2(accuracy, tmp_path, capsys):
    assert accuracy.main(["report", "--results", str(tmp_path), "--docs", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_plans_pair_every_cage_run_with_an_ste_parent_in_the_plan(accuracy):
    specs = accuracy.full_plan({})
    keys = {s.key for s in specs}
    for spec in specs:
        if spec.parent is not None:
            assert spec.parent.key in keys
            assert spec.silence in accuracy.BRANCH_POINTS
    pretrain = [s for s in specs if s.study == "pretrain"]
    assert {s.seed for s in pretrain} == {0, 1, 2}
    assert {round(s.tokens_per_block_param) for s in specs if s.study == "map"} == {15, 50, 150}
    formats = [s for s in specs if s.study == "formats"]
    assert {s.quantizer for s in formats} == {"int", "mxfp4", "nvfp4"} and {s.seed for s in formats} == {0, 1, 2}
    assert {s.fmt for s in formats} == {"w4a4-int", "w4a4-mxfp4", "w4a4-nvfp4"}
    assert json.dumps([s.key for s in specs])  # keys are plain strings


# sha256 of the run keys of full_plan({}) then quick_plan(), one a line, in plan order (289 keys). The results files
# are keyed by these: a change of a key or of the order retrains finished runs or reorders a running measurement.
PLAN_KEYS_SHA256 = "048d48bc034a529d97c912e0c04d5ee3fb67d7c777fc0d12ac0da54a4b431e6c"


def test_plan_keys_and_order_are_pinned(accuracy):
    import hashlib

    keys = [s.key for s in accuracy.full_plan({})] + [s.key for s in accuracy.quick_plan()]
    assert len(keys) == 289
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest() == PLAN_KEYS_SHA256, (
        "the benchmark's run keys or their order changed: finished results would no longer match; update the pin "
        "only for a deliberate change of the plan"
    )


@pytest.mark.parametrize(
    ("quantizer", "export_format", "tolerance"),
    # int: fp32 both sides; MXFP4: stock transformers computes in bfloat16 (the fp32 model does not)
    [("int", "compressed-tensors", 1e-5), ("mxfp4", "mxfp4-pack-quantized", 1e-2)],
)
def test_served_export_of_a_w4a4_run_serves_its_training_loss(accuracy, tmp_path, quantizer, export_format, tolerance):
    """The served-loss column: export with the CLI's defaults, stock transformers in a process without hf_cage."""
    spec = accuracy.Spec("map", "ste", 0, w_bits=4, a_bits=4, quantizer=quantizer, save=True, **accuracy.QUICK)
    record = accuracy.train(spec, tmp_path)
    row = accuracy.served_record(record, tmp_path)
    assert (row["export_format"], row["export_options"]) == (export_format, "default")
    assert row["loader"] == "stock transformers (no hf_cage)"
    assert row["eval_loss_served"] == pytest.approx(record["eval_loss"], abs=tolerance)
    table = accuracy.served_table([row])
    assert f"{record['eval_loss']:.4f} | {row['eval_loss_served']:.4f}" in table


@pytest.mark.parametrize("method", ["bf16", "ste", "cage"])
def test_benchmark_runs_use_the_recipes_training_arguments(accuracy, method):
    """The benchmark's CAGEConfig is the one recipes/pretrain_llama.py builds from the tiny preset and the flags."""
    recipes = str(REPO / "recipes")
    sys.path.insert(0, recipes)
    try:
        import pretrain_llama
        from recipe_common import parse_arguments, prepare_training_args
    finally:
        sys.path.remove(recipes)
    spec = accuracy.Spec("pretrain", method, 1, 1500)
    if method != "bf16":
        spec = replace(spec, w_bits=3, a_bits=3)
    if method == "cage":
        spec = replace(spec, lam=13.0, silence=0.5)
    argv = ["--config", "tiny", "--method", method, "--max_steps", "1500", "--seed", "1", "--output_dir", "x"]
    argv += ["--w_bits", "3", "--a_bits", "3"] if method != "bf16" else []
    argv += ["--cage_lambda", "13", "--cage_silence_ratio", "0.5"] if method == "cage" else []
    _, _, recipe_args, expected = parse_arguments(pretrain_llama.argument_types(), argv)
    prepare_training_args(expected, recipe_args, "x")
    got = accuracy.training_args(spec, "x")
    fields = ["learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "adam_beta1"]
    fields += ["adam_beta2", "adam_epsilon", "weight_decay", "max_grad_norm", "per_device_train_batch_size"]
    fields += ["gradient_accumulation_steps", "max_steps", "seed", "optim"]
    assert {f: getattr(got, f) for f in fields} == {f: getattr(expected, f) for f in fields}
    if method != "bf16":
        assert got.quant_config() == expected.quant_config()
    if method == "cage":
        assert got.cage_kwargs() == expected.cage_kwargs()
    if method == "ste":  # lambda 0: no correction whatever the silence
        assert got.cage_lambda == expected.cage_lambda == 0


def test_served_exports_a_w3a3_int_run_that_stock_transformers_serves_as_trained(accuracy, tmp_path, capsys):
    """A saved W3A3 int run: exported with the defaults (compressed-tensors, 3-bit codes packed densely) and served
    by stock transformers at the trained loss."""
    spec = accuracy.Spec("map", "ste", 0, w_bits=3, a_bits=3, quantizer="int", save=True, **accuracy.QUICK)
    accuracy.append_result(tmp_path / "results", accuracy.train(spec, tmp_path))
    assert accuracy.main(["served", "--out", str(tmp_path), "--results", str(tmp_path / "results")]) == 0
    (row,) = accuracy.load_served(tmp_path / "results")
    assert row["export_error"] is None and row["export_format"] == "compressed-tensors"
    assert row["export_options"] == "default" and row["loader"] == "stock transformers (no hf_cage)"
    assert row["eval_loss_served"] == pytest.approx(row["eval_loss_trained"], abs=1e-5)


def test_a_practical_cage_run_branches_from_its_ste_run_with_the_lambda_of_its_pull(accuracy, quick_results):
    _, done = quick_results
    ste, cage = (s for s in quick_practical(accuracy) if s.method != "bf16" and s.pull in (None, 0.4))
    assert cage.parent == ste and done[cage.key]["steps_trained"] == 5  # silence 0.5 of 10 steps
    assert done[cage.key]["final_weights_sha"] != done[ste.key]["final_weights_sha"]
    lam = done[cage.key]["cage_lambda"]
    assert lam == cage.cage_lambda() > 0 and done[ste.key]["cage_lambda"] == 0
    assert accuracy.total_pull(cage.steps, cage.lr, lam, cage.silence) == pytest.approx(0.4, rel=1e-9)


def test_practical_plan_sweeps_the_pull_then_takes_its_choice_to_the_other_formats(accuracy):
    specs = accuracy.plan_practical({})
    base = specs[0]
    assert base == replace(accuracy.finetune_base(), study="practical") and base.save
    keys = [s.key for s in specs]
    # the one key planned twice: the 300-step CAGE run at the default pull, first as a format's cell, then in the
    # sweep (full_plan keeps the first)
    twice = {k for k in keys if keys.count(k) > 1}
    assert twice == {
        s.key
        for s in specs
        if s.steps == 300 and s.method == "cage" and s.fmt == "w4-int-g64" and s.pull == accuracy.PRACTICAL_LONG_PULL
    }
    assert len(twice) == 5 and len(set(keys)) == len(keys) - 5
    tuned = specs[1:]
    assert all(s.init == base.key for s in tuned)
    # 3x longer (the finetune study's 300 steps) on 5 seeds: every format at the default pull, and the pull sweep
    long = {s.key: s for s in tuned if s.steps != 100}
    assert {(s.steps, s.seed) for s in long.values()} == {(300, seed) for seed in range(5)}
    assert len(long) == 5 * (1 + 5 * 2 + 5)  # BF16; STE and CAGE in 5 formats; the 5 other pulls of the sweep
    assert {s.pull for s in long.values() if s.fmt != "w4-int-g64" and s.method == "cage"} == {0.2}
    sweep = [s for s in tuned if s.pull is not None and s.silence == 0.5 and s.steps == 100]
    assert {(s.fmt, s.seed, s.pull) for s in sweep} == {
        ("w4-int-g64", seed, pull) for seed in range(5) for pull in (0.03, 0.1, 0.2, 0.4, 1, 2)
    }
    # the same sweep at CAGEConfig's default silence comes last
    late = [s for s in tuned if s.silence == 0.8]
    assert specs[-len(late) :] == late and {(s.seed, s.pull) for s in late} == {(s.seed, s.pull) for s in sweep}
    assert all(s.parent.key in keys and s.silence in accuracy.BRANCH_POINTS for s in sweep + late)
    # group 128 divides neither width of this model (64, 192): not planned
    assert {s.fmt for s in tuned if s.method == "ste"} == {
        "w4-int-g64",
        "w4-int-g32",
        "w3-int-g64",
        "w4-mxfp4",
        "w4-nvfp4",
    }
    short_other = [i for i, s in enumerate(specs) if s.fmt == "w4-int-g32" and s.steps == 100]
    assert specs.index(sweep[-1]) < min(short_other)  # the sweep first
    # until every sweep run has finished, the other formats have no 100-step CAGE run; then CAGE at the best mean pull
    short_cage = [s for s in specs if s.method == "cage" and s.steps == 100]
    assert accuracy.practical_choice({}) is None and len(sweep + late) == len(short_cage)
    results = {s.key: {"eval_loss": 3.0 + abs(s.pull - 0.2) + 0.01 * s.seed} for s in sweep}
    assert accuracy.practical_choice(results) == 0.2
    chosen = [
        s for s in accuracy.plan_practical(results) if s.method == "cage" and s.fmt != "w4-int-g64" and s.steps == 100
    ]
    assert len(chosen) == 4 * 5 and {s.pull for s in chosen} == {0.2}
    assert all(s.parent.fmt == s.fmt and s.parent.seed == s.seed for s in chosen)


def test_practical_tables_lead_with_300_steps_and_give_the_paired_share_its_standard_error_and_wins(
    accuracy, tmp_path
):
    import math
    import statistics
    from dataclasses import asdict

    specs = {s.key: s for s in accuracy.plan_practical({}, 3)[1:]}.values()
    losses = {  # (steps, method) -> per seed; every format's STE alike
        (100, "bf16"): (3.00, 3.10, 3.20),
        (100, "ste"): (3.10, 3.30, 3.25),
        (300, "bf16"): (2.90, 3.00, 3.05),
        (300, "ste"): (3.00, 3.08, 3.15),
    }
    cage_at = {(n, p): tuple(x + 0.01 for x in losses[n, "ste"]) for n in (100, 300) for p in accuracy.PRACTICAL_PULLS}
    cage_at[100, 0.1] = (3.05, 3.20, 3.26)  # the lowest mean loss at 100 steps: the choice; loses seed 2
    cage_at[100, 2.0] = (3.09, 3.29, 3.24)
    cage_at[300, 0.2] = (2.95, 3.05, 3.16)  # the default pull at 300 steps: wins seeds 0 and 1
    rows = []
    for s in specs:
        if s.method == "ste" and s.fmt != "w4-int-g64" and s.steps == 100:
            continue  # the other formats at 100 steps: not run yet
        loss = cage_at[s.steps, s.pull][s.seed] if s.method == "cage" else losses[s.steps, s.method][s.seed]
        rows.append({**asdict(s), "key": s.key, "eval_loss": loss, "cage_lambda": s.cage_lambda()})
    assert accuracy.practical_default(rows) == 0.1

    def cells(n: int, pull: float) -> str:
        b, st, c = losses[n, "bf16"], losses[n, "ste"], cage_at[n, pull]
        shares = [(y - z) / (y - x) for x, y, z in zip(b, st, c)]
        se = statistics.stdev(shares) / math.sqrt(3)
        wins = sum(z < y for y, z in zip(st, c))
        means = [statistics.mean(v) for v in (b, st, c)]
        return (
            f"| 3 | **{statistics.mean(shares):+.1%}** ± {se:.1%} | {wins} / 3 | {means[0]:.4f} | {means[1]:.4f} | "
            f"{means[2]:.4f} | {means[1] - means[0]:+.4f} |"
        )

    table = accuracy.practical_table(rows).splitlines()
    labels = ["W4A16 int, group 64", "W4A16 int, group 32", "W3A16 int, group 64", "W4A16 MXFP4", "W4A16 NVFP4"]
    # first every format at 300 steps, CAGE at the default pull; then 100 steps at the sweep's choice
    assert table[2:] == [f"| {label} | 300 | 0.2 (fine-tuning default) {cells(300, 0.2)}" for label in labels] + [
        f"| W4A16 int, group 64 | 100 | 0.1 (the 100-step sweep's choice) {cells(100, 0.1)}"
    ]
    assert "| 2 / 3 | 3.1000 | 3.2167 | 3.1700 | +0.1167 |" in table[-1]
    sweep = accuracy.practical_sweep_table(rows)
    lam = {(s.steps, s.pull, s.silence): f"{s.cage_lambda():.4g}" for s in specs if s.method == "cage"}
    assert f"| 100 | 0.5 | 0.1 (chosen) | {lam[100, 0.1, 0.5]} | 3 |" in sweep
    assert (
        f"| 100 | 0.8 | 2 | {lam[100, 2.0, 0.8]} | 3 |" in sweep
        and f"| 300 | 0.5 | 2 | {lam[300, 2.0, 0.5]} | 3 |" in sweep
    )
    assert accuracy.plot_practical_pull(rows, tmp_path / "pull.png") and (tmp_path / "pull.png").stat().st_size > 1000


def test_practical_table_before_any_finished_triple_says_so(accuracy):
    assert accuracy.practical_table([]).splitlines()[2].startswith("| (no format has finished")

"""The main job (README command 1): a tiny Llama on real text, trained with CAGE W4A4 on CPU, compared with
BF16 and STE runs of the same size, exported as a 4-bit compressed-tensors checkpoint with its model card.

    make demo                                   # sets up .venv, then runs this script
    python recipes/demo.py                      # the same, in an existing environment
    python recipes/demo.py --max_steps 100      # a shorter run
    python recipes/demo.py --rerun_baselines    # retrain BF16 and STE even if cached results match

Every run is `recipes/pretrain_llama.py --config tiny` (the `int` quantizer, so the export is a standard
compressed-tensors checkpoint that plain transformers loads). Baselines whose metrics.json matches the
requested steps are reused. Outputs, under --output_dir: bf16/, ste/, cage/ (model, metrics.json,
loss_curve.png) and export/ (packed 4-bit weights, config, tokenizer, README.md model card).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parent
METHODS = ("bf16", "ste", "cage")


def _cached_metrics(run_dir: Path, max_steps: int) -> dict | None:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics if metrics.get("steps") == max_steps and (run_dir / "config.json").is_file() else None


def _train(method: str, run_dir: Path, args) -> dict:
    sys.path.insert(0, str(RECIPES))
    import pretrain_llama

    argv = ["--config", "tiny", "--method", method, "--quantizer", "int", "--w_bits", "4", "--a_bits", "4"]
    argv += ["--max_steps", str(args.max_steps), "--output_dir", str(run_dir), "--seed", str(args.seed)]
    argv += ["--cache_dir", str(Path(args.output_dir) / "cache")]
    if pretrain_llama.main(argv) != 0:
        raise SystemExit(f"demo: the {method} run failed; see the message above")
    return json.loads((run_dir / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo", help="where runs and the export go")
    parser.add_argument("--max_steps", type=int, default=300, help="optimizer steps per run (the tiny preset's 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run")
    parser.add_argument("--rerun_baselines", action="store_true", help="retrain BF16 and STE even if cached")
    args = parser.parse_args(argv)

    out = Path(args.output_dir)
    results = {}
    for method in METHODS:
        run_dir = out / method
        cached = None if method == "cage" or args.rerun_baselines else _cached_metrics(run_dir, args.max_steps)
        if cached:
            print(f"demo: reusing the cached {method} run in {run_dir} (eval_loss {cached['eval_loss']:.4f})")
        results[method] = cached or _train(method, run_dir, args)

    # The model card shows the baselines next to CAGE.
    cage_metrics = out / "cage" / "metrics.json"
    metrics = json.loads(cage_metrics.read_text())
    metrics["baselines"] = {m: results[m]["eval_loss"] for m in ("bf16", "ste")}
    cage_metrics.write_text(json.dumps(metrics, indent=2))

    from hf_cage.cli import main as hf_cage_cli

    export_dir = out / "export"
    code = hf_cage_cli(["export", str(out / "cage"), "--output-dir", str(export_dir), "--overwrite",
                        "--model-name", "tiny-llama-shakespeare-cage-w4a4"])  # fmt: skip
    if code != 0:
        return code

    gap = results["ste"]["eval_loss"] - results["bf16"]["eval_loss"]
    closed = (results["ste"]["eval_loss"] - results["cage"]["eval_loss"]) / gap if gap > 0 else float("nan")
    print("\n| method | eval loss | perplexity | steps | tokens | wall time |")
    print("|---|---|---|---|---|---|")
    for method in METHODS:
        r = results[method]
        label = "BF16 (unquantized)" if method == "bf16" else f"{method.upper()} W4A4"
        print(f"| {label} | {r['eval_loss']:.4f} | {r['eval_perplexity']:.2f} | {r['steps']} | {r['tokens']:,} "
              f"| {r['wall_time_s']:.0f} s |")  # fmt: skip
    print(f"\nCAGE closed {closed:+.1%} of the STE-to-BF16 gap in this single-seed run. A run this short (about 1.4")
    print("tokens per block parameter) is too short for CAGE to help; docs/results.md measures where it does.")
    print(f"\nRuns:        {out}/{{bf16,ste,cage}} (model, metrics.json, loss_curve.png)")
    print(f"4-bit model: {export_dir} (compressed-tensors pack-quantized; model card: {export_dir}/README.md)")
    print(f"Load it:     AutoModelForCausalLM.from_pretrained('{export_dir}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy benchmark: full precision vs STE vs CAGE at W4A4, W3A3 and W2A2 on real text, offline, on CPU.

A tiny Llama (hidden 64, 2 layers, 4 heads, SwiGLU 192, vocab 2048: 0.11M block parameters) is trained on
the Shakespeare corpus for 1500 steps of 16 x 256 tokens (6.1M tokens, about 55 tokens per block parameter:
the regime where CAGE's effect showed up in a first experiment, see issue 6), AdamW (0.9, 0.95), weight decay
0.1 on block linears, peak LR 2e-3 with 10% warmup and cosine decay to 10%, gradient clip 1.0, QuEST W/A
quantizer (Hadamard, RMS clip).

CAGE equals STE during its silence period, so every CAGE run branches from the STE run of the same seed at
the end of silence (weights, Adam moments and data position restored exactly) and only the remaining steps
are trained: the comparison is paired, and each variant costs ``1 - silence`` of a run.

    # everything (about 1.5 h on 2 CPU cores); resumable: finished runs are kept in OUT/runs.jsonl
    python benchmarks/accuracy.py run --out outputs/accuracy --workers 2
    # the table, the plot and docs/results.md from what has finished
    python benchmarks/accuracy.py report --out outputs/accuracy --write-docs
    # seconds-long smoke run of the whole pipeline (used by the test suite)
    python benchmarks/accuracy.py run --out /tmp/acc --quick && python benchmarks/accuracy.py report --out /tmp/acc
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Setup:
    """Everything that is held fixed across methods."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    ffn: int = 192
    vocab: int = 2048
    block: int = 256
    batch: int = 16
    steps: int = 1500
    lr: float = 2e-3
    warmup: float = 0.1
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_blocks: int = 512
    documents: int | None = None  # use only the first N plays (the quick smoke run)


QUICK = Setup(hidden=32, ffn=64, vocab=300, block=32, batch=4, steps=12, eval_blocks=8, documents=4)


@dataclass(frozen=True)
class Run:
    method: str  # "fp" (full precision), "ste", "cage"
    bits: int | None  # weights and activations (WbAb); None for fp
    seed: int
    cage_lambda: float = 0.0
    silence: float = 0.0

    @property
    def key(self) -> str:
        if self.method == "fp":
            return f"fp-s{self.seed}"
        name = f"{self.method}-w{self.bits}a{self.bits}-s{self.seed}"
        return name if self.method == "ste" else f"{name}-l{self.cage_lambda:g}-q{self.silence:g}"


def plan(seeds: int, quick: bool) -> list[Run]:
    """Headline rows (W3A3, W4A4: ``seeds`` seeds), W2A2 and full precision (fewer), a lambda sweep at W3A3."""
    if quick:
        return [Run("fp", None, 0), Run("ste", 4, 0), Run("cage", 4, 0, 10.0, 0.5)]
    variants = [(13.0, 0.5), (56.0, 0.8)]  # total pull sum(lr_t * lambda_t) of about 2 (CAGE.md section 3)
    runs = [Run("fp", None, s) for s in range(min(seeds, 2))]
    for bits, n_seeds in ((3, seeds), (4, seeds), (2, 1)):  # the W3A3 and W4A4 rows are the headline
        for s in range(n_seeds):
            runs.append(Run("ste", bits, s))
            runs += [Run("cage", bits, s, lam, sil) for lam, sil in variants]
    runs += [Run("cage", 3, 0, lam, 0.5) for lam in (4.0, 30.0)]
    runs += [Run("cage", 3, 0, lam, 0.8) for lam in (10.0, 150.0)]
    return runs


def lr_at(step: int, setup: Setup) -> float:
    """Linear warmup then cosine to ``final_lr_ratio`` of the peak; ``step`` is 1-based."""
    warm = max(1, round(setup.warmup * setup.steps))
    if step <= warm:
        return setup.lr * step / warm
    progress = (step - warm) / max(1, setup.steps - warm)
    floor = setup.final_lr_ratio
    return setup.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------------
# Data and model


@functools.lru_cache(maxsize=2)
def prepare_data(out: Path, setup: Setup):
    """Token blocks of the train and validation splits (document split of the shipped corpus)."""
    from hf_cage.data import load_token_blocks, shakespeare_files, train_bpe_tokenizer, write_document_split

    files = shakespeare_files()[: setup.documents]
    train_txt, val_txt = write_document_split(files, out / "data")
    tokenizer = train_bpe_tokenizer([train_txt], vocab_size=setup.vocab, cache_dir=out / "cache")
    train = load_token_blocks([train_txt], tokenizer, setup.block)["input_ids"]
    val = load_token_blocks([val_txt], tokenizer, setup.block)["input_ids"][: setup.eval_blocks]
    return train, val


def build_model(run: Run, setup: Setup):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_cage

    torch.manual_seed(run.seed)
    config = LlamaConfig(
        vocab_size=setup.vocab,
        hidden_size=setup.hidden,
        intermediate_size=setup.ffn,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads,
        num_key_value_heads=setup.heads,
        max_position_embeddings=setup.block,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    if run.bits is not None:
        hf_cage.quantize_model(model, hf_cage.QuantConfig(w_bits=run.bits, a_bits=run.bits, quantizer="quest"))
    return model


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on the block linears only (the paper's setup); embeddings, head and norms decay-free."""
    from hf_cage.quant import LLAMA_TARGET_MODULES

    decay, other = [], []
    for name, param in model.named_parameters():
        is_block_linear = name.endswith(".weight") and name.split(".")[-2] in LLAMA_TARGET_MODULES
        (decay if is_block_linear else other).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def build_optimizer(model, run: Run, setup: Setup):
    """AdamW for full precision and STE (CAGE with lambda 0 is AdamW exactly); hf-cage's CAGE for CAGE runs."""
    import torch

    groups = param_groups(model, setup.weight_decay)
    if run.method != "cage":
        return torch.optim.AdamW(groups, lr=setup.lr, betas=(0.9, 0.95), eps=1e-8)
    from hf_cage.optim import CAGE, weight_quantizers_of

    return CAGE(
        groups,
        lr=setup.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        cage_lambda=run.cage_lambda,
        cage_silence_ratio=run.silence,
        cage_schedule="linear_ramp",
        total_steps=setup.steps,
        weight_quantizers=weight_quantizers_of(model),
    )


def batch_indices(seed: int, step: int, n_blocks: int, batch: int):
    """The blocks of 1-based ``step``: a per-epoch permutation drawn from (seed, epoch), so any step can be
    replayed after a branch without replaying the ones before it."""
    import torch

    per_epoch = n_blocks // batch
    epoch, offset = divmod(step - 1, per_epoch)
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[offset * batch : (offset + 1) * batch]


def evaluate(model, val, batch: int = 32) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val), batch):
            x = val[i : i + batch]
            total += model(input_ids=x, labels=x).loss.item() * len(x)
            count += len(x)
    model.train()
    return total / count


def train(run: Run, setup: Setup, out: Path, data) -> dict:
    """Train ``run`` to the end; STE runs leave snapshots at the silence points CAGE runs branch from."""
    import torch

    train_blocks, val = data
    snapshots = out / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True)
    model = build_model(run, setup)
    optimizer = build_optimizer(model, run, setup)
    start = 1
    if run.method == "cage":
        parent = snapshots / f"{Run('ste', run.bits, run.seed).key}-at{round(run.silence * setup.steps)}.pt"
        state = torch.load(parent, weights_only=False)
        model.load_state_dict(state["model"])
        # CAGE keeps its own lambda / silence / total_steps over the saved AdamW state (moments, step count).
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"] + 1
    branch_points = {round(s * setup.steps) for s in (0.5, 0.8)} if run.method == "ste" else set()
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(start, setup.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, setup)
        x = train_blocks[batch_indices(run.seed, step, len(train_blocks), setup.batch)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), setup.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step in branch_points:
            target = snapshots / f"{run.key}-at{step}.pt"
            tmp = target.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)
            os.replace(tmp, target)
    return {
        **asdict(run),
        "key": run.key,
        "eval_loss": evaluate(model, val),
        "train_loss_last50": sum(losses[-50:]) / len(losses[-50:]),
        "steps_trained": len(losses),
        "seconds": time.perf_counter() - t0,
        "setup": asdict(setup),
    }


# ----------------------------------------------------------------------------------------------------------
# Orchestration


def _done(out: Path) -> dict[str, dict]:
    path = out / "runs.jsonl"
    if not path.exists():
        return {}
    return {r["key"]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def _worker(args) -> dict:
    run, setup, out = args
    return train(run, setup, out, prepare_data(out, setup))


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def command_run(args) -> int:
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = QUICK if args.quick else replace(Setup(), steps=args.steps) if args.steps else Setup()
    prepare_data(out, setup)  # tokenizer and split once, before the workers start
    todo = [r for r in plan(args.seeds, args.quick) if r.key not in _done(out)]
    if args.only:
        todo = [r for r in todo if any(part in r.key for part in args.only.split(","))]
    # Parents first: a CAGE run needs its STE run's snapshot.
    waves = [[r for r in todo if r.method != "cage"], [r for r in todo if r.method == "cage"]]
    bar = tqdm(total=len(todo), desc="accuracy runs")
    pool = ProcessPoolExecutor(args.workers, initializer=_one_thread) if args.workers > 1 else None
    for wave in waves:
        jobs = [(r, setup, out) for r in wave]
        for result in pool.map(_worker, jobs) if pool else map(_worker, jobs):
            with open(out / "runs.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            bar.set_postfix_str(f"{result['key']}: {result['eval_loss']:.4f}")
            bar.update()
    if pool:
        pool.shutdown()
    bar.close()
    return 0


def summarize(results: dict[str, dict]) -> dict:
    """Mean losses per method and the share of the STE-to-fp gap each CAGE variant closes (paired by seed)."""
    import statistics

    fp = [r["eval_loss"] for r in results.values() if r["method"] == "fp"]
    fp_mean = statistics.mean(fp) if fp else float("nan")
    rows = []
    for r in sorted(results.values(), key=lambda r: (r["method"] != "ste", -(r["bits"] or 99), r["key"])):
        if r["method"] != "cage":
            continue
        parent = results.get(Run("ste", r["bits"], r["seed"]).key)
        if parent is None:
            continue
        gap = parent["eval_loss"] - fp_mean
        rows.append({**r, "ste_loss": parent["eval_loss"], "gap_closed": (parent["eval_loss"] - r["eval_loss"]) / gap})
    return {"fp_mean": fp_mean, "fp": fp, "paired": rows}


def command_report(args) -> int:
    import statistics

    out = Path(args.out)
    results = _done(out)
    if not results:
        print(f"no finished runs in {out}/runs.jsonl; run `python benchmarks/accuracy.py run --out {out}` first")
        return 2
    summary = summarize(results)
    lines = [
        "| run | bits | seeds | eval loss (mean) | per seed | share of STE-to-FP gap closed (mean, per seed) |",
        "|---|---|---|---|---|---|",
    ]
    fp = summary["fp"]
    if fp:
        lines.append(
            f"| full precision | - | {len(fp)} | {statistics.mean(fp):.4f} | {' / '.join(f'{v:.4f}' for v in fp)} | |"
        )
    by_variant: dict[tuple, list] = {}
    for r in results.values():
        if r["method"] == "ste":
            by_variant.setdefault(("STE", r["bits"], None, None), []).append(r)
    for r in summary["paired"]:
        by_variant.setdefault(("CAGE", r["bits"], r["cage_lambda"], r["silence"]), []).append(r)
    for (name, bits, lam, sil), rs in sorted(
        by_variant.items(), key=lambda kv: (-kv[0][1], kv[0][0] != "STE", kv[0][3] or 0, kv[0][2] or 0)
    ):
        rs = sorted(rs, key=lambda r: r["seed"])
        losses = [r["eval_loss"] for r in rs]
        label = name if lam is None else f"CAGE lambda {lam:g}, silence {sil:g}"
        closed = ""
        if name == "CAGE":
            shares = [r["gap_closed"] for r in rs]
            closed = f"{statistics.mean(shares):+.1%} ({' / '.join(f'{s:+.0%}' for s in shares)})"
        lines.append(
            f"| {label} | W{bits}A{bits} | {len(rs)} | {statistics.mean(losses):.4f} | "
            f"{' / '.join(f'{v:.4f}' for v in losses)} | {closed} |"
        )
    table = "\n".join(lines)
    print(table)
    plot = out / "accuracy.png"
    _plot(results, summary, plot)
    print(f"plot: {plot}")
    if args.write_docs:
        _write_docs(table, results, summary, plot)
    return 0


def _plot(results, summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bits_list = sorted({r["bits"] for r in results.values() if r["bits"]}, reverse=True)
    variants = sorted({(r["cage_lambda"], r["silence"]) for r in summary["paired"]}, key=lambda v: (v[1], v[0]))
    for i, bits in enumerate(bits_list):
        ste = [r["eval_loss"] for r in results.values() if r["method"] == "ste" and r["bits"] == bits]
        ax.scatter([i - 0.2] * len(ste), ste, color="k", marker="o", label="STE")
        for j, variant in enumerate(variants):
            ys = [
                r["eval_loss"]
                for r in summary["paired"]
                if r["bits"] == bits and (r["cage_lambda"], r["silence"]) == variant
            ]
            if ys:
                label = f"CAGE lambda {variant[0]:g}, silence {variant[1]:g}"
                ax.scatter([i - 0.1 + 0.06 * j] * len(ys), ys, marker="^", s=22, color=f"C{j}", label=label)
    if summary["fp"]:
        ax.axhline(summary["fp_mean"], color="k", ls="--", label="full precision")
    ax.set_xticks(range(len(bits_list)), [f"W{b}A{b}" for b in bits_list])
    ax.set_ylabel("validation loss")
    ax.set_title("STE vs CAGE, tiny Llama on Shakespeare (lower is better)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_docs(table: str, results, summary, plot: Path) -> None:
    import shutil

    docs = REPO / "docs"
    shutil.copyfile(plot, docs / "accuracy.png")
    setup = next(iter(results.values()))["setup"]
    seconds = sum(r["seconds"] for r in results.values())
    text = (REPO / "docs" / "results.md").read_text() if (REPO / "docs" / "results.md").exists() else ""
    marker = "<!-- accuracy-table -->"
    block = (
        f"{marker}\nSetup: `{json.dumps(setup)}`; {len(results)} runs, {seconds / 60:.0f} CPU-minutes of "
        f"training.\n\n{table}\n\n![validation loss per method](accuracy.png)\n{marker}"
    )
    if marker in text:
        head, _, rest = text.partition(marker)
        _, _, tail = rest.partition(marker)
        text = head + block + tail
    else:
        text = text + "\n" + block + "\n"
    (docs / "results.md").write_text(text)
    print(f"wrote {docs / 'results.md'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the runs that are not finished yet")
    run.add_argument("--out", default="outputs/accuracy", help="run folder (default: outputs/accuracy)")
    run.add_argument("--seeds", type=int, default=3, help="seeds per method and bit width (default: 3)")
    run.add_argument("--workers", type=int, default=2, help="parallel training processes (default: 2)")
    run.add_argument("--steps", type=int, default=None, help="override the number of steps (default: 1500)")
    run.add_argument("--only", default=None, help="comma-separated substrings of run keys to train")
    run.add_argument("--quick", action="store_true", help="a seconds-long smoke run of the whole pipeline")
    run.set_defaults(func=command_run)
    report = sub.add_parser("report", help="print the table and draw the plot from finished runs")
    report.add_argument("--out", default="outputs/accuracy")
    report.add_argument("--write-docs", action="store_true", help="also write docs/results.md and docs/accuracy.png")
    report.set_defaults(func=command_report)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``served`` command: the saved QAT runs exported with ``hf-cage export``'s defaults and evaluated as served."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .orchestrate import load_results
from .run import prepare_data
from .spec import spec_of


def served_record(record: dict, out: Path) -> dict:
    """Export a saved QAT run with ``hf-cage export``'s defaults and evaluate the export as a user serves it.

    :func:`hf_cage.export.served.evaluate_served` (stock transformers without hf_cage for compressed-tensors
    exports, :func:`hf_cage.load_quantized` for the hf-cage format; token-weighted loss), on the validation blocks
    the training-time loss was measured on.
    """
    import torch

    from hf_cage.export import ExportError, export_checkpoint
    from hf_cage.export.served import evaluate_served

    spec = spec_of(record)
    export_dir = out / "exports" / spec.key
    common = dict(overwrite=True, progress=False, log=None)
    loss, loader, error, result = None, None, None, None
    try:
        result, how = export_checkpoint(out / "models" / spec.key, export_dir, **common), "default"
    except ExportError:  # the CLI's advice for what no format holds as trained: a lossy compressed-tensors export
        how = "--format compressed-tensors --allow-lossy"
        try:
            result = export_checkpoint(
                out / "models" / spec.key, export_dir, format="compressed-tensors", allow_lossy=True, **common
            )
        except ExportError as err:
            error = str(err)
    if result is not None:
        ids = torch.as_tensor(prepare_data(out, spec)[2].with_format("torch")[:]["input_ids"])
        served = evaluate_served(export_dir, ids, batch_size=32)
        loss, loader = served.loss, served.loader
    return {
        "key": spec.key,
        "study": spec.study,
        "method": spec.method,
        "fmt": spec.fmt,
        "seed": spec.seed,
        "steps": spec.steps,
        "hidden": spec.hidden,
        "lam": spec.lam,
        "silence": spec.silence,
        "export_format": result.format if result else None,
        "export_error": error,
        "export_options": how,
        "loader": loader,
        "eval_loss_trained": record["eval_loss"],
        "eval_loss_served": loss,
        "served_minus_trained": None if loss is None else loss - record["eval_loss"],
        "code_commit": os.environ.get("HF_CAGE_CODE_COMMIT"),
    }


def command_served(args) -> int:
    out, results = Path(args.out), Path(args.results)
    done = load_results(results)
    served_file = results / "served.jsonl"
    measured = set()
    if served_file.exists():
        measured = {json.loads(line)["key"] for line in served_file.read_text().splitlines() if line.strip()}
    todo = [
        r
        for r in done.values()
        if r.get("save")
        and r["method"] != "bf16"
        and r["key"] not in measured
        and (out / "models" / r["key"]).is_dir()
    ]
    for record in sorted(todo, key=lambda r: r["key"]):
        row = served_record(record, out)
        with open(served_file, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        served = row["eval_loss_served"]
        how = f"{served:.4f} ({row['export_format']}, {row['loader']})" if served is not None else "not exportable"
        print(f"{row['key']}: trained {row['eval_loss_trained']:.4f}, served {how}", flush=True)
    return 0


def load_served(results: Path) -> list[dict]:
    path = results / "served.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def served_table(rows: list[dict]) -> str:
    lines = [
        "| run | format | export | loaded by | eval loss, trained model | eval loss, served export | "
        "served - trained |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["fmt"], r["method"] != "ste", r["seed"], r["key"])):
        label = "STE" if r["method"] == "ste" else f"CAGE lambda {r['lam']:g}, silence {r['silence']:g}"
        if r["eval_loss_served"] is None:
            lines.append(
                f"| {label}, seed {r['seed']} ({r['study']}, {r['steps']} steps) | {r['fmt']} | not exportable: "
                f"{r['export_error']} | - | {r['eval_loss_trained']:.4f} | - | - |"
            )
            continue
        lines.append(
            f"| {label}, seed {r['seed']} ({r['study']}, {r['steps']} steps) | {r['fmt']} | "
            f"{r['export_format']} ({r['export_options']}) | "
            f"{r['loader']} | {r['eval_loss_trained']:.4f} | {r['eval_loss_served']:.4f} | "
            f"{r['served_minus_trained']:+.4f} |"
        )
    return "\n".join(lines)

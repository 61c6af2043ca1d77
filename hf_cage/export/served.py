"""Evaluate an export the way a user serves it.

:func:`evaluate_served` is the one way to measure an export's loss as served: an export that stock loaders read
(its ``config.json`` has a ``quantization_config``: compressed-tensors integer and FP4 formats, also from other
tools) is loaded by stock transformers in a separate Python that never imports hf_cage; an hf-cage-format export
(QuEST, Hadamard: what stock loaders cannot express) by :func:`hf_cage.load_quantized`, here. Both compute the
same token-weighted loss (:func:`token_loss`)::

    from hf_cage.export.served import evaluate_served, served_logits

    result = evaluate_served("exports/run-w4", input_ids)   # ServedEvaluation: loss, tokens, loader
    logits = served_logits("exports/run-w4", input_ids)     # (B, T, vocab) float32, stock transformers
    many = served_eval_many([dir_a, dir_b], input_ids, loss=True)   # one stock process, several exports

The stock process runs this module's own source as a script (it imports only torch, transformers and safetensors
at module level), loads each export with ``AutoModelForCausalLM.from_pretrained(path, dtype=...)`` in the dtype
its format is served in (:func:`stock_dtype`), and fails if any ``hf_cage`` module was imported; tensors travel
through a temporary safetensors file and logits come back as float32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100
STOCK_LOADER = "stock transformers (no hf_cage)"
HF_CAGE_LOADER = "hf_cage.load_quantized"


def token_loss(
    model, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, batch_size: int = 32, logits: bool = False
) -> tuple[float, int, torch.Tensor | None]:
    """Next-token cross-entropy of ``model`` on ``input_ids`` ``(B, T)``, ``batch_size`` rows per forward pass.

    Returns ``(sum of token losses, number of predicted tokens, logits or None)``: labels (default ``input_ids``)
    are shifted by one and ``-100`` labels ignored, so ``sum / count`` is the mean over every predicted token of
    the whole input, whatever the batch sizes (a short last batch or rows with ignored labels weigh by their
    tokens, not as one batch mean). Logits ``(B, T, vocab)`` float32 when ``logits``.
    """
    labels = input_ids if labels is None else labels
    total, count, outputs = torch.zeros((), dtype=torch.float64), 0, []
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], batch_size):
            out = model(input_ids=input_ids[start : start + batch_size]).logits.float()
            targets = labels[start : start + batch_size, 1:]
            losses = torch.nn.functional.cross_entropy(
                out[:, :-1].reshape(-1, out.shape[-1]),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            )
            total += losses.double().sum()
            count += int((targets != IGNORE_INDEX).sum())
            if logits:
                outputs.append(out)
    return total.item(), count, torch.cat(outputs).contiguous() if logits else None


@dataclass
class ServedResult:
    """What the stock loader computed: ``logits`` ``(B, T, vocab)`` fp32 and/or the token-weighted loss."""

    logits: torch.Tensor | None = None
    loss: float | None = None
    tokens: int = 0


@dataclass
class ServedEvaluation:
    """:func:`evaluate_served`'s answer: the token-weighted loss, the tokens it averages, who loaded the export."""

    loss: float
    tokens: int
    loader: str  # STOCK_LOADER or HF_CAGE_LOADER
    dtype: str  # the compute dtype of the loaded model


def evaluate_served(
    export_dir: str | os.PathLike,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    batch_size: int = 32,
    num_threads: int | None = None,
    timeout: float = 1800,
) -> ServedEvaluation:
    """Loss of an export as its format is served: stock transformers in a process without hf_cage when stock
    loaders read it (``config.json`` has a ``quantization_config``), else :func:`hf_cage.load_quantized` (float32).

    ``labels`` default to ``input_ids`` (``-100`` ignored); the loss is :func:`token_loss`'s token-weighted mean.

    Raises:
        ValueError: ``export_dir`` is not an export (no readable ``config.json``, or a training checkpoint).
        RuntimeError: the stock process failed (its last stderr lines are in the message).
    """
    config = _read_config(export_dir)
    if "quantization_config" in config:
        result = served_eval(
            export_dir,
            input_ids,
            labels=labels,
            logits=False,
            loss=True,
            batch_size=batch_size,
            num_threads=num_threads,
            timeout=timeout,
        )
        return ServedEvaluation(result.loss, result.tokens, STOCK_LOADER, stock_dtype(export_dir))
    from .load import load_quantized

    model = load_quantized(export_dir, dtype=torch.float32)
    total, count, _ = token_loss(model, input_ids, labels, batch_size=batch_size)
    return ServedEvaluation(total / max(count, 1), count, HF_CAGE_LOADER, "float32")


def _read_config(export_dir: str | os.PathLike) -> dict:
    config_file = Path(export_dir) / "config.json"
    try:
        return json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{str(export_dir)!r} has no readable config.json ({err}); pass an export directory"
        ) from None


def stock_dtype(export_dir: str | os.PathLike) -> str:
    """The dtype stock transformers loads ``export_dir`` in: ``"bfloat16"`` for the FP4 formats, else ``"float32"``
    (computed here in the parent; the child gets it as a string and never imports hf_cage).

    Refuses, with what to do, an export stock transformers cannot load (the hf-cage format).
    """
    from ..qat import EXPORT_KEY
    from .formats import stock_load_dtype

    config = _read_config(export_dir)
    if "quantization_config" not in config and EXPORT_KEY in config:
        raise ValueError(
            f"{str(export_dir)!r} is an hf-cage format export, which stock transformers cannot load; "
            "evaluate it with hf_cage.load_quantized (evaluate_served does) or export with --format compressed-tensors"
        )
    quantization = config.get("quantization_config") or {}
    return stock_load_dtype(quantization.get("format"))


def served_eval_many(
    export_dirs: list[str | os.PathLike],
    input_ids: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    logits: bool = True,
    loss: bool = False,
    batch_size: int = 8,
    num_threads: int | None = None,
    timeout: float = 1800,
) -> list[ServedResult]:
    """:func:`served_eval` of several exports in one stock process (one interpreter start-up); same order."""
    from safetensors.torch import load_file, save_file

    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_CAGE")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="hf-cage-served-") as tmp:
        tensors = {"input_ids": input_ids.detach().to(torch.int64).cpu().contiguous()}
        if labels is not None:
            tensors["labels"] = labels.detach().to(torch.int64).cpu().contiguous()
        save_file(tensors, Path(tmp) / "inputs.safetensors")
        dirs = [os.path.abspath(d) for d in export_dirs]
        dtypes = [stock_dtype(d) for d in dirs]
        threads = torch.get_num_threads() if num_threads is None else num_threads
        inputs = str(Path(tmp) / "inputs.safetensors")
        job = json.dumps([dirs, dtypes, inputs, tmp, logits, loss, int(batch_size), threads])
        source = Path(__file__).read_text()  # this module, run as a script: see _stock_child
        done = subprocess.run(
            [sys.executable, "-c", source, job], cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"the stock loader failed on {dirs} (exit {done.returncode}):\n{tail}")
        outs = [load_file(Path(tmp) / f"{i}.safetensors") for i in range(len(dirs))]
    return [
        ServedResult(
            logits=out.get("logits"),
            loss=out["loss"].item() if "loss" in out else None,
            tokens=int(out["tokens"].item()) if "tokens" in out else 0,
        )
        for out in outs
    ]


def served_eval(export_dir: str | os.PathLike, input_ids: torch.Tensor, **kwargs) -> ServedResult:
    """Load ``export_dir`` with stock transformers (float32; bf16 for FP4 formats) in a fresh process and run
    ``input_ids`` ``(B, T)``.

    Keyword args (also of :func:`served_eval_many`): ``labels`` ``(B, T)`` targets for the loss (default
    ``input_ids``; ``-100`` ignored); ``logits`` / ``loss``: what to return (default logits only);
    ``batch_size``: rows per forward pass in the child; ``num_threads``: torch threads in the child (default:
    this process's, so both sides sum in the same order); ``timeout`` in seconds.

    Raises:
        ValueError: an hf-cage-format export or no export (use :func:`evaluate_served` for any format).
        RuntimeError: the child failed (its last stderr lines are in the message).
    """
    return served_eval_many([export_dir], input_ids, **kwargs)[0]


def served_logits(export_dir: str | os.PathLike, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Stock-transformers logits ``(B, T, vocab)`` (float32) of ``export_dir`` on ``input_ids``."""
    return served_eval(export_dir, input_ids, logits=True, loss=False, **kwargs).logits


def served_loss(
    export_dir: str | os.PathLike, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
) -> float:
    """Stock-transformers token-weighted next-token cross-entropy of ``export_dir`` on ``input_ids`` (float)."""
    return served_eval(export_dir, input_ids, labels=labels, logits=False, loss=True, **kwargs).loss


def _stock_child(job: str) -> None:
    """The stock process (``python -c <this file> job``): stock transformers only, no hf_cage."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    export_dirs, dtypes, inputs_file, out_dir, want_logits, want_loss, batch_size, threads = json.loads(job)
    if threads:
        torch.set_num_threads(threads)
    inputs = load_file(inputs_file)
    for index, (export_dir, dtype) in enumerate(zip(export_dirs, dtypes)):
        model, info = AutoModelForCausalLM.from_pretrained(
            export_dir, dtype=getattr(torch, dtype), output_loading_info=True
        )
        tied = getattr(model, "_tied_weights_keys", None) or []
        missing = [k for k in info["missing_keys"] if k not in tied]
        if missing or info["unexpected_keys"]:
            sys.exit(f"{export_dir}: stock loading left weights unset: {missing[:3]} {info['unexpected_keys'][:3]}")
        total, count, logits = token_loss(
            model.eval(), inputs["input_ids"], inputs.get("labels"), batch_size=batch_size, logits=want_logits
        )
        result = {"logits": logits} if want_logits else {}
        if want_loss:
            result["loss"] = torch.tensor([total / max(count, 1)], dtype=torch.float64)
            result["tokens"] = torch.tensor([count])
        imported = sorted(name for name in sys.modules if name == "hf_cage" or name.startswith("hf_cage."))
        if imported:
            sys.exit(f"hf_cage was imported by the stock loader: {imported}")
        save_file(result, f"{out_dir}/{index}.safetensors")


if __name__ == "__main__":
    _stock_child(sys.argv[1])

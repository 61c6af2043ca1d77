"""Evaluate an export the way a user serves it: stock transformers in a process that never imports hf_cage.

Each call starts a separate Python (``sys.executable``) that imports only torch, transformers and
safetensors (compressed-tensors through transformers' quantizer), loads the export with
``AutoModelForCausalLM.from_pretrained(path, dtype=...)`` and runs the given token ids; tensors travel
through a temporary safetensors file. The dtype is ``torch.float32``, except for compressed-tensors' FP4
formats (``mxfp4-`` / ``nvfp4-pack-quantized``), which transformers decompresses into bf16 weights and
can only run in ``torch.bfloat16`` (a float32 load fails at the first forward); logits come back as
float32. The child checks that no ``hf_cage`` module was imported.
So the numbers are what a stock loader computes from the files, not what hf-cage believes it computes::

    from hf_cage.export.served import served_eval, served_logits, served_loss

    logits = served_logits("exports/run-w4", input_ids)        # (B, T, vocab) float32
    loss = served_loss("exports/run-w4", input_ids)            # mean next-token cross-entropy (float)
    both = served_eval("exports/run-w4", input_ids, logits=True, loss=True)   # ServedResult
    many = served_eval_many([dir_a, dir_b], input_ids, loss=True)          # one process, several exports

The loss is transformers' own causal-LM loss (``model(input_ids, labels=...)``: shifted by one, mean
over the predicted tokens, ``-100`` labels ignored), accumulated over ``batch_size`` rows at a time and
weighted by predicted tokens, so it equals one call on the whole batch.
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

_CHILD = r"""
import json
import sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

export_dirs, dtypes, inputs_file, out_dir, want_logits, want_loss, batch_size, threads = json.loads(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
inputs = load_file(inputs_file)
input_ids, labels = inputs["input_ids"], inputs.get("labels")
for index, (export_dir, dtype) in enumerate(zip(export_dirs, dtypes)):
    model, info = AutoModelForCausalLM.from_pretrained(
        export_dir, dtype=getattr(torch, dtype), output_loading_info=True
    )
    missing = [k for k in info["missing_keys"] if k not in (getattr(model, "_tied_weights_keys", None) or [])]
    if missing or info["unexpected_keys"]:
        unexpected = info["unexpected_keys"][:3]
        raise SystemExit(f"{export_dir}: stock loading left weights unset: {missing[:3]} {unexpected}")
    model.eval()
    logits, loss_sum, count = [], 0.0, 0
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size]
            rows = ids if labels is None else labels[start : start + batch_size]
            out = model(input_ids=ids, labels=rows if want_loss else None)
            if want_logits:
                logits.append(out.logits.float())
            if want_loss:
                n = int((rows[:, 1:] != -100).sum())
                loss_sum += out.loss.double().item() * n
                count += n
    result = {}
    if want_logits:
        result["logits"] = torch.cat(logits).contiguous()
    if want_loss:
        result["loss"] = torch.tensor([loss_sum / max(count, 1)], dtype=torch.float64)
        result["tokens"] = torch.tensor([count])
    bad = sorted(name for name in sys.modules if name == "hf_cage" or name.startswith("hf_cage."))
    if bad:
        raise SystemExit(f"hf_cage was imported by the stock loader: {bad}")
    save_file(result, f"{out_dir}/{index}.safetensors")
"""


@dataclass
class ServedResult:
    """What the stock loader computed: ``logits`` ``(B, T, vocab)`` fp32 and/or the mean cross-entropy."""

    logits: torch.Tensor | None = None
    loss: float | None = None
    tokens: int = 0


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
    """:func:`served_eval` of several exports in one child process (one interpreter start-up); same order."""
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
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, job], cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout
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


def stock_dtype(export_dir: str | os.PathLike) -> str:
    """The dtype stock transformers loads ``export_dir`` in: ``"bfloat16"`` for the FP4 formats, else ``"float32"``
    (the format objects' :func:`~hf_cage.export.formats.stock_load_dtype`; computed here in the parent, the child
    gets it as a string and never imports hf_cage).

    Refuses, with what to do, an export stock transformers cannot load (the hf-cage format).
    """
    from .formats import stock_load_dtype

    config_file = Path(export_dir) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{export_dir!r} has no readable config.json ({err}); pass an export directory") from None
    if "quantization_config" not in config and "hf_cage_export" in config:
        raise ValueError(
            f"{export_dir!r} is an hf-cage format export, which stock transformers cannot load; "
            "evaluate it with hf_cage.load_quantized, or export with --format compressed-tensors"
        )
    quantization = config.get("quantization_config") or {}
    return stock_load_dtype(quantization.get("format"))


def served_eval(export_dir: str | os.PathLike, input_ids: torch.Tensor, **kwargs) -> ServedResult:
    """Load ``export_dir`` with stock transformers (float32; bf16 for FP4 formats) in a fresh process and run
    ``input_ids`` ``(B, T)``.

    Keyword args (also of :func:`served_eval_many`): ``labels`` ``(B, T)`` targets for the loss (default
    ``input_ids``; ``-100`` ignored); ``logits`` / ``loss``: what to return (default logits only);
    ``batch_size``: rows per forward pass in the child; ``num_threads``: torch threads in the child (default:
    this process's, so both sides sum in the same order); ``timeout`` in seconds.

    Raises:
        RuntimeError: the child failed (its last stderr lines are in the message).
    """
    return served_eval_many([export_dir], input_ids, **kwargs)[0]


def served_logits(export_dir: str | os.PathLike, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Stock-transformers logits ``(B, T, vocab)`` (float32) of ``export_dir`` on ``input_ids``."""
    return served_eval(export_dir, input_ids, logits=True, loss=False, **kwargs).logits


def served_loss(
    export_dir: str | os.PathLike, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
) -> float:
    """Stock-transformers mean next-token cross-entropy of ``export_dir`` on ``input_ids`` (float)."""
    return served_eval(export_dir, input_ids, labels=labels, logits=False, loss=True, **kwargs).loss

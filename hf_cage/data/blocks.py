"""Plain-text files -> fixed-length token blocks for causal language modelling."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def _fingerprint(paths: list[str], tokenizer, block_size: int) -> str | None:
    """A cache key from the text, the tokenizer's serialized form and the block size, so that every process (the
    recipes' parallel runs) finds the same cached token blocks, which datasets' own hash of the tokenizer object
    does not guarantee. ``None`` (datasets' hashing) for a tokenizer without a serialized form."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256(f"blocks-v1:{block_size}:{tokenizer.eos_token_id}:".encode())
    digest.update(backend.to_str().encode())
    for p in paths:
        digest.update(Path(p).read_bytes())
    return digest.hexdigest()[:32]


def load_token_blocks(files: list[str | os.PathLike], tokenizer, block_size: int, num_proc: int | None = None):
    """A ``datasets.Dataset`` of ``input_ids`` / ``labels`` blocks of ``block_size`` tokens.

    Every document ends with the EOS token; the stream is cut into full blocks (the tail is dropped).
    """
    from datasets import load_dataset

    paths = [str(Path(f)) for f in files]
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"text file not found: {p}")
        if Path(p).stat().st_size == 0:
            raise ValueError(f"text file is empty: {p}")
    raw = load_dataset("text", data_files=paths, split="train", sample_by="paragraph")
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        return {"ids": [ids + [eos] for ids in tokenizer(batch["text"])["input_ids"]]}

    def group(batch):
        stream = [t for ids in batch["ids"] for t in ids]
        n = len(stream) // block_size * block_size
        blocks = [stream[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    key = _fingerprint(paths, tokenizer, block_size)
    tokens = raw.map(
        tokenize,
        batched=True,
        remove_columns=raw.column_names,
        num_proc=num_proc,
        desc="Tokenizing",
        new_fingerprint=key and f"{key}-tokens",
    )
    blocks = tokens.map(
        group,
        batched=True,
        batch_size=1000,
        remove_columns=["ids"],
        num_proc=num_proc,
        desc=f"Packing into {block_size}-token blocks",
        new_fingerprint=key and f"{key}-blocks",
    )
    if len(blocks) == 0:
        raise ValueError(f"{paths} hold fewer than block_size={block_size} tokens; use more text or a smaller block")
    return blocks.with_format("torch")

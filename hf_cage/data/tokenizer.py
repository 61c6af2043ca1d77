"""A byte-level BPE tokenizer trained locally on the training text (no download), cached on disk."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def _fingerprint(files: list[Path], vocab_size: int) -> str:
    digest = hashlib.sha256(f"bpe-v1:{vocab_size}".encode())
    for f in sorted(files):
        digest.update(Path(f).read_bytes())
    return digest.hexdigest()[:16]


def train_bpe_tokenizer(
    files: list[str | os.PathLike], vocab_size: int = 2048, cache_dir: str | os.PathLike = "outputs/cache"
):
    """Train (or reuse from ``cache_dir``) a byte-level BPE on ``files``; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    files = [Path(f) for f in files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"training text not found: {missing}")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least 260")
    target = Path(cache_dir) / f"bpe-{vocab_size}-{_fingerprint(files, vocab_size)}"
    if not (target / "tokenizer.json").is_file():
        bpe = ByteLevelBPETokenizer()
        bpe.train(
            [str(f) for f in files],
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS.values()),
            show_progress=False,
        )
        wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".bpe-"))
        wrapped.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(target)

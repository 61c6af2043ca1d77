"""What an export is asked to do: :class:`ExportOptions`, declared once for ``export_model``,
``export_checkpoint`` and ``hf-cage export``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from .card import CardOptions
from .errors import ExportError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)
# transformers' ``PreTrainedModel.save_pretrained`` default: one file up to 50 GB.
DEFAULT_MAX_SHARD_SIZE = "50GB"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class ExportOptions:
    """The options of an export.

    Attributes:
        format: ``"auto"`` (the compressed-tensors format of the model's grid when stock loaders serve the model as
            trained, else hf-cage), ``"compressed-tensors"``, ``"mxfp4-pack-quantized"``,
            ``"nvfp4-pack-quantized"`` or ``"hf-cage"``; see :mod:`hf_cage.export.formats`.
        weights_only: do not declare activation quantization in the compressed-tensors config.
        allow_lossy: let a compressed-tensors format hold a model it cannot serve as trained (QuEST grid, Hadamard,
            another activation rule); the measured difference is logged and put in the card.
        dtype: dtype of the tensors left dense (embeddings, norms, ``lm_head``); ``"auto"``: as trained.
        max_shard_size: largest weight file, as transformers' ``save_pretrained`` (a byte count, ``"5GB"``,
            ``"2GiB"``); a bigger model is split into ``model-0000i-of-0000n.safetensors`` plus the index.
        overwrite: replace a non-empty output folder.
        card: what the model card says about the model (:class:`~hf_cage.export.CardOptions`).
        progress: show a progress bar over the layers.
        log: where the one-line reports go (format chosen by ``auto``, measured parity); ``None``: nowhere.
        push_to_hub: Hub repo id to upload the export to in one commit (``None``: not pushed).
        token: Hub token for the push (default ``HF_TOKEN``, then the saved login).
        private: create the repo as private.
        revision: branch to commit to (created if missing; default ``main``).
        commit_message: message of the upload commit.
    """

    format: str = "auto"
    weights_only: bool = False
    allow_lossy: bool = False
    dtype: str = "auto"
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    overwrite: bool = False
    card: CardOptions | None = None
    progress: bool = True
    log: Callable[[str], None] | None = _stderr
    push_to_hub: str | None = None
    token: str | None = None
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None

    @classmethod
    def of(cls, options: ExportOptions | None = None, **overrides) -> ExportOptions:
        """``options`` (default: all defaults) with ``overrides`` applied, by field name.

        Raises:
            TypeError: an override names no field of :class:`ExportOptions`.
        """
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(
                f"unknown export option(s) {', '.join(unknown)}; the options are the fields of ExportOptions"
            )
        return replace(options or cls(), **overrides)

    def shard_bytes(self) -> int:
        """Check ``dtype`` and ``max_shard_size`` before anything is loaded or written; returns the shard size in
        bytes.

        Raises:
            ExportError: ``dtype`` is not a choice, or ``max_shard_size`` is not a size.
        """
        if self.dtype not in DTYPE_CHOICES:
            raise ExportError(f"dtype={self.dtype!r} is not supported; choose one of {', '.join(DTYPE_CHOICES)}")
        size = parse_size(self.max_shard_size)
        if size <= 0:
            raise ExportError(
                f"max_shard_size={self.max_shard_size!r} is not a size; pass e.g. 5GB, 500MB, 2GiB or a byte count"
            )
        return size


def parse_size(size) -> int:
    """Bytes of a shard size as the Hugging Face libraries read it, or -1 if it is none: a byte count, a decimal
    size as ``save_pretrained`` passes it to huggingface_hub (``5GB``, ``1.5GB``, ``500MB``, ``40KB``, ``1TB``), or a
    binary one as transformers' ``convert_file_size_to_int`` reads it (``2GiB``, ``512MiB``, ``64KiB``)."""
    from huggingface_hub.serialization._base import parse_size_to_int
    from transformers.utils.hub import convert_file_size_to_int

    if not isinstance(size, str):
        try:
            return int(size)
        except (TypeError, ValueError):
            return -1
    text = size.strip()
    if text.isdigit():
        return int(text)
    for parse in (parse_size_to_int, convert_file_size_to_int):
        try:
            return int(parse(text))
        except (ValueError, TypeError):
            continue
    return -1

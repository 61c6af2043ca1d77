"""The two ways an export can fail: bad input (nothing written, exit 2) or a failed push (export kept)."""

from __future__ import annotations


class ExportError(ValueError):
    """The checkpoint, model or options cannot be exported as asked; nothing was written."""


class PushError(RuntimeError):
    """The local export succeeded but uploading it to the Hub failed."""

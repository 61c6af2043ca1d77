"""How an export can fail, each with its exit code in ``hf-cage export``.

- :class:`ExportError` (exit 2): bad input or options; nothing was written.
- :class:`ExportWriteError` (exit 3): the operating system refused a read or write (permissions, disk
  full, ...); nothing was left behind.
- :class:`PushError` (exit 1): the local export succeeded, uploading it failed; the export is kept.
"""

from __future__ import annotations


class ExportError(ValueError):
    """The checkpoint, model or options cannot be exported as asked; nothing was written."""


class ExportWriteError(OSError):
    """Writing the export failed at the operating-system level; nothing was left behind."""


class PushError(RuntimeError):
    """The local export succeeded but uploading it to the Hub failed (``result``: what was exported)."""

    result = None

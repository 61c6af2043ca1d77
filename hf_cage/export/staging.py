"""The output folder of an export, written all at once or not at all.

:func:`check_output_dir` refuses what an export must not replace. :func:`staged_folder` gives a staging folder
beside the output (``.NAME.hf-cage-staging-PID-XXXXXXXX``, made like any ``mkdir``, so its mode follows the
umask) and renames it into place when the writing succeeded; on any failure or interrupt it removes the staging
folder and the parent folders it created, so ``output_dir`` is left as it was. Staging folders of an export
whose process is gone (killed) are removed by the next export into the same parent folder; nothing else is.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ExportError, ExportWriteError

_TOOL_FOLDER = re.compile(r"^\..+\.hf-cage-(?:staging|old)-(\d+)-[0-9a-f]{8}$")
_OS_CODE = re.compile(r"(?:os error|code:) (\d+)")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(
    output_dir: str | os.PathLike, overwrite: bool, checkpoint: str | os.PathLike | None = None
) -> Path:
    """Refuse what an export must not write to; returns the absolute path.

    Refused (:class:`ExportError`): a file; a non-empty directory unless ``overwrite``; a folder that is, contains
    or lies inside ``checkpoint`` (replacing it would delete the checkpoint); a folder that contains the current
    directory. :class:`ExportWriteError` when the folder cannot be inspected.
    """
    output_dir = Path(os.path.abspath(output_dir))
    if checkpoint is not None:
        ckpt = Path(os.path.abspath(checkpoint))
        if output_dir == ckpt or _inside(ckpt.resolve(), output_dir.resolve()):
            raise ExportError(
                f"--output-dir {str(output_dir)!r} is or contains the checkpoint {str(ckpt)!r}; "
                "writing there would replace it: choose another directory"
            )
        if _inside(output_dir.resolve(), ckpt.resolve()):
            raise ExportError(
                f"--output-dir {str(output_dir)!r} is inside the checkpoint {str(ckpt)!r}; "
                "write the export outside the checkpoint folder"
            )
    try:
        _check_existing_output(output_dir, overwrite)
    except OSError as err:
        raise ExportWriteError(err.errno, f"cannot inspect {str(output_dir)!r}: {os_reason(err)}") from None
    return output_dir


def _check_existing_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"output path {str(output_dir)!r} is a file; pass a directory")
    if output_dir.is_dir():
        if any(output_dir.iterdir()) and not overwrite:
            raise ExportError(f"output directory {str(output_dir)!r} is not empty; pass --overwrite to replace it")
        if _inside(Path.cwd().resolve(), output_dir.resolve()):
            raise ExportError(
                f"--output-dir {str(output_dir)!r} is (or contains) the current directory, which an export "
                "replaces: run from another directory or choose another --output-dir"
            )


@contextmanager
def staged_folder(output_dir: Path) -> Iterator[Path]:
    """Yield an empty staging folder for the export to ``output_dir`` (already checked); when the block ends
    normally, give its files the umask's mode and rename it to ``output_dir``, replacing what was there.

    Raises:
        ExportWriteError: the operating system refused a write (an ``OSError`` of the block included); the
            staging folder and the parent folders made for it are removed, as on any other exception.
    """
    created = _missing_folders(output_dir.parent)
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_folders(output_dir.parent)
        staging = _new_folder(output_dir, "staging")
    except OSError as err:
        _remove_empty_folders(created)
        raise ExportWriteError(err.errno, f"cannot create {str(output_dir)!r}: {os_reason(err)}") from None
    except BaseException:
        _remove_empty_folders(created)
        raise
    try:
        yield staging
        _follow_umask(staging)
        _move_into_place(staging, output_dir)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty_folders(created)
        message = f"could not write the export to {str(output_dir)!r}: {os_reason(err)}"
        raise ExportWriteError(err.errno, message) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty_folders(created)
        raise


def _new_folder(output_dir: Path, kind: str) -> Path:
    """A new, recognisably named folder beside ``output_dir``, mode from the umask like any ``mkdir``."""
    while True:
        path = output_dir.parent / f".{output_dir.name}.hf-cage-{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_folders(parent: Path) -> None:
    """Remove staging / old folders of this tool whose export process is gone (killed mid-write)."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _TOOL_FOLDER.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename ``staging`` to ``output_dir``, replacing whatever was there (already checked)."""
    if output_dir.exists():
        old = _new_folder(output_dir, "old")
        os.rename(output_dir, old / "previous")
        try:
            os.rename(staging, output_dir)
        except BaseException:  # OSError, or Ctrl-C / SIGTERM between the renames: the old export stays in place
            os.rename(old / "previous", output_dir)
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, output_dir)


def _missing_folders(folder: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` of ``folder`` would create, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _remove_empty_folders(folders: list[Path]) -> None:
    """Remove the folders an export created (innermost first) if they are still empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def _follow_umask(staging: Path) -> None:
    """Give the files the mode ``open`` gives under the umask (safetensors writes 0600); the staging folder was
    made by ``mkdir``, so its mode is ``0777 & ~umask``."""
    mode = staging.stat().st_mode & 0o666
    for file in staging.iterdir():
        if file.is_file() and not file.is_symlink():
            os.chmod(file, mode)


def as_os_error(err: Exception) -> OSError:
    """safetensors' write error as an ``OSError``; it reports the OS error code inside its message
    (``I/O error: No space left on device (os error 28)``)."""
    match = _OS_CODE.search(str(err))
    code = int(match.group(1)) if match else errno.EIO
    return OSError(code, os.strerror(code) if match else " ".join(str(err).split()))


def os_reason(err: OSError) -> str:
    """The reason of an ``OSError`` in a few words, with the file it names."""
    reason = err.strerror or errno.errorcode.get(err.errno or 0) or type(err).__name__
    where = err.filename if isinstance(err.filename, str) else None
    return f"{reason} ({where})" if where else reason

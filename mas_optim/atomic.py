"""Crash-safe file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Callable, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

# O_EXCL: never reuse a file someone else created; O_BINARY: no newline translation (Windows)
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def atomic_write(
    path: PathLike, data: bytes, *, before_replace: Optional[Callable[[], None]] = None
) -> None:
    """Write ``data`` to ``path`` atomically.

    The bytes go to a temporary file ``.<name>.<random>.tmp`` in the same folder (so the final
    rename never crosses a file system), are flushed and fsync'ed, and the temporary file is
    renamed over ``path`` with :func:`os.replace`; the folder is then fsync'ed so the rename
    itself survives a power cut. A crash at any moment leaves either the previous ``path`` or
    the complete new one.

    Missing parent folders are created (as ``mkdir -p``; made durable the same way). The file
    gets the permissions ``open(path, "wb")`` would give it: those of the file it replaces,
    or for a new file ``0o666`` less the process umask.

    Args:
        path: destination file.
        data: the complete new contents.
        before_replace: called once the temporary file is durable and before the rename. It
            exists for crash tests (a process killed here must leave the old file intact).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    _make_folders(folder)
    try:
        keep_mode: Optional[int] = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        keep_mode = None
    fd, tmp_name = _create_temp(folder, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            if keep_mode is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), keep_mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


def _create_temp(folder: Path, name: str) -> tuple[int, str]:
    # os.open applies the umask to 0o666, as open() does (tempfile.mkstemp would give 0o600)
    while True:
        tmp_name = str(folder / f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp_name, _TEMP_FLAGS, 0o666), tmp_name
        except FileExistsError:
            continue


def _make_folders(folder: Path) -> None:
    """``mkdir -p folder``; each folder created is fsync'ed into its parent, so that a file
    renamed into it after a power cut is not in a folder that vanished."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)  # FileExistsError if a file stands in the way
        _fsync_dir(new.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename durable. Not every platform lets a directory be opened (Windows).
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)

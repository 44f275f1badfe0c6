"""Crash-safe file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(
    path: PathLike, data: bytes, *, before_replace: Optional[Callable[[], None]] = None
) -> None:
    """Write ``data`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder (so the final rename never crosses a
    file system), are flushed and fsync'ed, and the temporary file is renamed over ``path`` with
    :func:`os.replace`; the folder is then fsync'ed so the rename itself survives a power cut.
    A crash at any moment leaves either the previous ``path`` or the complete new one.

    Args:
        path: destination file. Its folder must exist.
        data: the complete new contents.
        before_replace: called once the temporary file is durable and before the rename. It
            exists for crash tests (a process killed here must leave the old file intact).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
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

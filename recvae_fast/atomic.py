"""Atomic file writes for run folders: a file is either its old version or its new one, never torn.

Each write goes to a temporary file in the target's folder (`.<name>.<random>.tmp`), is flushed and
fsynced, renamed over the target, and the folder is fsynced so that the rename itself survives a
crash. A kill at any point leaves at most a stale temporary file, which `remove_stale_temporaries`
clears (a writer holding the run folder's lock calls it).
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

TMP_SUFFIX = ".tmp"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a binary file object, then make its content the content of `path`
    atomically. The folder must exist. On any exception the target is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_output(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write a user's output file: `write(f)` on a binary file object. A regular file (or a new one)
    is written atomically, through a symlink to its target; anything else that exists (a device such
    as /dev/null or /dev/stdout, a FIFO) is written into as it is, never replaced by a regular file.
    An OSError names the file."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # follows symlinks
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    try:
        if mode is None or stat.S_ISREG(mode):
            atomic_write(os.path.realpath(path), write)
        else:
            with open(path, "wb") as f:  # O_TRUNC does nothing to a device or a FIFO
                write(f)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that an interrupted `atomic_write` left in `folder`; returns them."""
    removed = []
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink()
            removed.append(p)
    return removed

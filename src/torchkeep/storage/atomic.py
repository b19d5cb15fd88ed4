"""Atomic file replacement: write under a temporary name, fsync, rename.

A reader of ``target`` sees either the previous file or the complete new one,
never a partial write, even if the process is killed mid-save.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from torchkeep.errors import PathIsDirectoryError

__all__ = ["atomic_target", "fsync_dir", "fsync_file"]

logger = logging.getLogger(__name__)

TEMP_MARKER = ".tmp-"


def fsync_file(path: Path) -> None:
    """Flush a file's data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file in it) to stable storage."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # some platforms cannot open directories; nothing more to do there
        return
    try:
        os.fsync(fd)
    except OSError:
        logger.debug("fsync of directory %s is not supported here", path)
    finally:
        os.close(fd)


def temp_name(target: Path) -> Path:
    """A unique hidden name next to ``target`` that keeps its suffix (writers check it)."""
    return target.with_name(f".{target.name}{TEMP_MARKER}{secrets.token_hex(4)}{target.suffix}")


@contextlib.contextmanager
def atomic_target(target: str | os.PathLike[str], *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it atomically becomes ``target``.

    Args:
        target (str | PathLike): the final path. Missing parent folders are created.
        durable (bool, default True): fsync the file and its folder, so the new
            file survives a power loss, not only a crash of the process.

    Raises:
        PathIsDirectoryError: ``target`` is an existing directory.

    Example:
        >>> with atomic_target("w.pt") as tmp:
        ...     torch.save(state, tmp)
    """
    final = Path(target)
    if final.is_dir():
        raise PathIsDirectoryError(final, action="write")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(final.parent)

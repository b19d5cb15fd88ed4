"""Atomic file replacement: write under a temporary name, fsync, rename.

A reader of ``target`` sees either the previous file or the complete new one,
never a partial write, even if the process is killed mid-save.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torchkeep.errors import PathIsDirectoryError

__all__ = ["atomic_target", "discard", "fsync_dir", "fsync_file", "wait_for_discards"]

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


_OLD_MARKER = ".old-"
_discard_lock = threading.Lock()
_discarder: ThreadPoolExecutor | None = None


def temp_name(target: Path) -> Path:
    """A fresh path with ``target``'s very name, in a hidden folder of its own next to it.

    Writers see the final name: ``torch.save`` names a zip's root folder after
    the file's stem, so the file keeps the root a direct save would give it.
    """
    folder = target.with_name(f".{target.name}{TEMP_MARKER}{secrets.token_hex(4)}")
    folder.mkdir()
    return folder / target.name


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
        old = _swap_in(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        with contextlib.suppress(OSError):
            tmp.parent.rmdir()
        raise
    with contextlib.suppress(OSError):
        tmp.parent.rmdir()
    if durable:
        fsync_dir(final.parent)
    if old is not None:
        discard(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two names atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        _renameat2 = None  # this kernel or filesystem cannot: plain renames from now on
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _load_renameat2() -> Any:
    if sys.platform != "linux":
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a C library without it (glibc < 2.28, musl)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2 = _load_renameat2()


def _swap_in(tmp: Path, final: Path) -> Path | None:
    """Put ``tmp`` in place of ``final`` atomically; return a hidden name left holding the old file.

    Renaming over an existing file makes ext4 flush the new file's data first (its
    ``auto_da_alloc`` safeguard): for a 1 GiB file that cost as much as writing it. Swapping
    the two names with ``RENAME_EXCHANGE`` is just as atomic for readers and costs nothing;
    where it is unsupported, the old file gets a second name and ``os.replace`` does the job.
    """
    if not final.is_file():  # a new name (a pack): nothing to swap, nothing left by a killed swap
        os.replace(tmp, final)
        return None
    stale = _aside_name(final, "")
    with os.scandir(final.parent) as entries:  # (not Path.glob: it compiles a new pattern each time)
        left = [entry.path for entry in entries if entry.name.startswith(stale.name)]
    for path in left:  # left by a killed save (the names below are made while `final` exists)
        with contextlib.suppress(OSError):
            os.unlink(path)
    if _exchange(tmp, final):
        aside = _aside_name(final)
        os.rename(tmp, aside)  # to a new name: no flush
        return aside
    old = _keep_aside(final)
    os.replace(tmp, final)
    return old


def _aside_name(final: Path, token: str | None = None) -> Path:
    """The hidden name an old ``final`` is kept under while it is replaced (``token``: random)."""
    return final.with_name(f".{final.name}{_OLD_MARKER}{secrets.token_hex(4) if token is None else token}")


def _keep_aside(final: Path) -> Path | None:
    """A second name for the file about to be replaced, so the replace does not free its pages.

    Freeing a large file's pages happens inside the rename that drops its last
    name, which made replacing a 100 MB file cost more than writing it; the
    extra name moves that cost to a background thread. Stale names of a
    killed process are removed by the next save to the same target. ``final`` is a file.
    """
    aside = _aside_name(final)
    try:
        os.link(final, aside)
    except OSError:  # no hard links on this filesystem: the replace frees the old file itself
        return None
    return aside


def discard(path: Path) -> None:
    """Delete a file or folder now; the freeing of its data happens on a background thread.

    Freeing a large file's pages takes as long as writing it on some systems.
    Every name is unlinked before this returns (nothing is left for a reader
    or a listing to see), but each file is opened first: its last descriptor,
    closed on the background thread, is what frees the data.
    """
    if not os.path.lexists(path):
        return
    descriptors: list[int] = []
    if path.is_dir() and not path.is_symlink():
        for folder, _, files in os.walk(path, topdown=False):
            for name in files:
                _unlink_held(os.path.join(folder, name), descriptors)
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        if path.exists():  # something odd (permissions, a mount): the plain way
            shutil.rmtree(path, ignore_errors=True)
    else:
        _unlink_held(os.fspath(path), descriptors)
    if descriptors:
        _release_later(descriptors)


def _unlink_held(file: str, descriptors: list[int]) -> None:
    with contextlib.suppress(OSError):
        descriptors.append(os.open(file, os.O_RDONLY | os.O_NOFOLLOW))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(file)


def _release_later(descriptors: list[int]) -> None:
    global _discarder
    with _discard_lock:
        if _discarder is None:
            _discarder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchkeep-discard")
        _discarder.submit(_close_all, descriptors)


def wait_for_discards() -> None:
    """Block until the data of every path handed to :func:`discard` so far is freed."""
    with _discard_lock:
        pending = _discarder
    if pending is not None:
        pending.submit(lambda: None).result()


def _close_all(descriptors: list[int]) -> None:
    for fd in descriptors:
        with contextlib.suppress(OSError):
            os.close(fd)

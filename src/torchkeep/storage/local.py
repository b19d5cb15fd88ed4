"""A Store on a local (or network-mounted) filesystem.

Folders are written under a hidden temporary name inside the root and renamed
into place (atomic; fsynced when durable). Removal is synchronous for
readers: the folder is renamed aside and every file name unlinked before
``remove`` returns; only the freeing of the data (slow for large files on
some filesystems) is left to a background thread, which holds the last open
descriptor of each file. The writer lock is an ``flock`` on a lock file: the
kernel releases it when the holder dies, so a crashed writer never blocks
the next one, and what it left can be removed safely by whoever holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torchkeep.errors import ModelFileNotFoundError, PathIsDirectoryError, RunLockedError
from torchkeep.storage.atomic import atomic_target, discard, fsync_dir
from torchkeep.storage.base import register_backend
from torchkeep.storage.remote import resolve

__all__ = ["LocalLock", "LocalStore"]

logger = logging.getLogger(__name__)

_TMP = ".tmp-"
_OLD = ".old-"
_TRASH = ".trash-"


class LocalLock:
    """An ``flock`` held on ``path`` for as long as this object (or the process) lives."""

    def __init__(self, path: Path, directory: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise RunLockedError(directory, holder if isinstance(holder, dict) else {}) from None
        except BaseException:
            os.close(fd)
            raise
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd: int | None = fd
        self._finalizer = weakref.finalize(self, os.close, fd)  # the kernel drops the lock with the fd

    def refresh(self) -> None:
        """Nothing to renew: the kernel keeps the lock while the descriptor is open."""

    def release(self) -> None:
        """Unlock (the lock file stays: deleting it would race with the next writer opening it)."""
        self._finalizer()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _raise(err: OSError) -> None:
    raise err


class LocalStore:
    """A folder on a local filesystem."""

    shared = True
    atomic_publish = True
    in_place = True

    def __init__(self, root: str | os.PathLike[str], storage_options: Any = None) -> None:
        location = resolve(root, storage_options)
        if not isinstance(location, Path):  # pragma: no cover - open_store routes URLs elsewhere
            raise ValueError(f"{root} is not a local path")
        self.root = location
        self.url = str(location)

    # -- reading --------------------------------------------------------------------------------
    def public(self, name: str) -> Path:
        return self.root / name if name else self.root

    def name_of(self, path: str | os.PathLike[str]) -> str:
        return resolve(path).name

    def exists(self) -> bool:
        return self.root.is_dir()

    def folders(self) -> list[str]:
        try:
            return sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def sizes(self, name: str) -> dict[str, int] | None:
        folder = self.root / name
        found: dict[str, int] = {}

        def walk(path: str, prefix: str) -> None:  # os.scandir: a stat a file, no pathlib objects
            try:
                entries = os.scandir(path)
            except PermissionError:  # unreadable: nothing to list (as Path.rglob)
                return
            with entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            walk(entry.path, f"{prefix}{entry.name}/")
                        elif entry.is_file():
                            found[prefix + entry.name] = entry.stat().st_size
                    except (FileNotFoundError, NotADirectoryError):  # removed or replaced while listed
                        continue

        try:
            walk(os.fspath(folder), "")
        except (FileNotFoundError, NotADirectoryError):
            return None
        return found if folder.is_dir() else None  # (removed while listed: not there)

    def read(self, name: str, relative: str) -> bytes:
        return (self.root / name / relative).read_bytes()

    @contextlib.contextmanager
    def local(self, name: str) -> Iterator[Path]:
        yield self.root / name

    @contextlib.contextmanager
    def fetch(self, relative: str, *, allow_folder: bool = False) -> Iterator[Path]:
        path = self.public(relative)
        if path.is_dir() and not allow_folder:
            raise PathIsDirectoryError(path)
        if not path.exists():
            raise ModelFileNotFoundError(path)
        yield path

    # -- writing --------------------------------------------------------------------------------
    def stage(self, relative: str, *, durable: bool) -> contextlib.AbstractContextManager[Path]:
        return atomic_target(self.root / relative if relative else self.root, durable=durable)

    def lock_writer(self, name: str) -> LocalLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return LocalLock(self.root / name, self.root)

    def begin(self, name: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}{_TMP}{secrets.token_hex(4)}"
        tmp.mkdir()
        return tmp

    def scratch(self) -> Path:
        raise NotImplementedError("a local run folder is shared: every rank writes into begin()'s folder")

    def upload_part(self, tmp: Path, name: str, files: list[Path]) -> None:
        """Nothing to do: the files are already in the shared folder."""

    def publish(self, tmp: Path, name: str, *, durable: bool) -> Path:
        final = self.root / name
        if durable:
            for sub, _, _ in os.walk(tmp, onerror=_raise):
                fsync_dir(Path(sub))
        if final.exists():
            # replace: move the old one aside first; a crash in between is undone by clean_leftovers
            old = self.root / f".{name}{_OLD}{secrets.token_hex(4)}"
            os.rename(final, old)
            os.rename(tmp, final)
            discard(old)
        else:
            os.rename(tmp, final)
        if durable:
            fsync_dir(self.root)
        return final

    def abandon(self, tmp: Path, name: str) -> None:
        discard(tmp)

    def remove(self, name: str) -> None:
        trash = self.root / f"{_TRASH}{name}-{secrets.token_hex(4)}"
        os.rename(self.root / name, trash)  # gone for readers at once
        discard(trash)

    def remove_file(self, relative: str) -> None:
        path = self.root / relative
        discard(path)  # readers that opened it keep reading; its data is freed in the background
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def sync(self) -> None:
        if self.root.is_dir():
            fsync_dir(self.root)

    def clean_leftovers(self, is_ours: Callable[[str], bool]) -> list[str]:
        removed: list[str] = []
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name) if self.exists() else []:
            name, path = entry.name, Path(entry.path)
            if name.startswith(".") and _OLD in name:
                original = self.root / name[1:].split(_OLD)[0]
                if is_ours(original.name) and not original.exists():
                    os.rename(path, original)  # killed between the two renames of a replace
                    logger.warning("recovered %s from an interrupted replace", original.name)
                    continue
            stem = name[1:].split(_TMP)[0].split(_OLD)[0] if name.startswith(".") else ""
            if entry.is_dir() and (name.startswith(_TRASH) or (stem and is_ours(stem))):
                discard(path)
                removed.append(name)
                logger.info("removed %s left by an interrupted save", name)
        return removed


register_backend("", LocalStore)

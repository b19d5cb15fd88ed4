"""The Store protocol: where files and run folders live, whatever the backend.

A :class:`Store` is a root (a local folder, an fsspec URL) holding single
files and child folders (a run's checkpoint folders). Writers fill a *local*
folder and then publish it; readers get a *local* view of a child folder
(the folder itself on a local disk, a downloaded copy elsewhere). The
writer's lock on a run is the store's job too, because how to lock depends on
the backend (``flock`` on a disk, a lease object on an object store).

:func:`open_store` picks the backend by URL scheme from :data:`BACKENDS`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

__all__ = ["BACKENDS", "NO_LOCK", "Store", "WriterLock", "open_store", "register_backend", "scheme_of"]


class WriterLock(Protocol):
    """The writer's hold on a run: one writer at a time."""

    def refresh(self) -> None:
        """Renew the hold before a commit; raise :class:`RunLockedError` if it was lost."""

    def release(self) -> None:
        """Give the run up (idempotent)."""


class Store(Protocol):
    """A root that holds files and folders.

    Attributes:
        url: how users name the root (a local path as text, or the URL).
        shared: every rank of a job can write into the folder ``begin`` returns.
        atomic_publish: a published folder appears whole at once (a rename);
            when False, the manifest uploaded last is the commit and a folder
            without one is absent.
        in_place: ``local`` and ``fetch`` give the stored files themselves, not copies.

    Child names are relative paths; ``""`` is the root itself (a store opened
    on a single file reads and writes it as ``""``).
    """

    url: str
    shared: bool
    atomic_publish: bool
    in_place: bool

    # -- reading --------------------------------------------------------------------------------
    def public(self, name: str) -> Path | str:
        """How users name the child ``name`` (a Path locally, a URL remotely)."""

    def name_of(self, path: str | os.PathLike[str]) -> str:
        """The child name of a path or URL inside this root (``ValueError`` if outside)."""

    def exists(self) -> bool:
        """Whether the root exists."""

    def folders(self) -> list[str]:
        """The child folders (re-read, never cached); where publishing is not atomic, only
        those holding a manifest (committed)."""

    def sizes(self, name: str) -> dict[str, int] | None:
        """Every file of child folder ``name``, relative path -> bytes; ``None`` if it is gone."""

    def read(self, name: str, relative: str) -> bytes:
        """One file of a child folder (``FileNotFoundError`` if missing)."""

    def local(self, name: str) -> contextlib.AbstractContextManager[Path]:
        """A local folder with child ``name``'s files, valid inside the ``with``."""

    def fetch(self, relative: str, *, allow_folder: bool = False) -> contextlib.AbstractContextManager[Path]:
        """The local file ``relative`` (or a folder, when allowed); ``ModelFileNotFoundError`` if missing."""

    # -- writing --------------------------------------------------------------------------------
    def stage(self, relative: str, *, durable: bool) -> contextlib.AbstractContextManager[Path]:
        """A local path to write; on success it becomes the file ``relative``, whole or not at all."""

    def lock_writer(self, name: str) -> WriterLock:
        """Take the writer lock kept in ``name`` (``RunLockedError`` naming the holder if taken)."""

    def begin(self, name: str) -> Path:
        """A fresh local folder to fill for child ``name``."""

    def scratch(self) -> Path:
        """A private local folder for a rank whose files are uploaded by ``upload_part``."""

    def upload_part(self, tmp: Path, name: str, files: list[Path]) -> None:
        """Put some files of ``tmp`` into child ``name`` before its commit."""

    def publish(self, tmp: Path, name: str, *, durable: bool) -> Path | str:
        """Make ``tmp`` the child ``name`` (its manifest last: the commit, where publishing is not atomic)."""

    def abandon(self, tmp: Path, name: str) -> None:
        """Drop a failed save's files."""

    def remove(self, name: str) -> None:
        """Delete child ``name``: gone for readers when this returns."""

    def remove_file(self, relative: str) -> None:
        """Delete the file ``relative`` (and folders it leaves empty inside the root); no error if gone."""

    def sync(self) -> None:
        """Make the renames and removals done so far durable (a disk's folder fsync; nothing remotely)."""

    def clean_leftovers(self, is_ours: Callable[[str], bool]) -> list[str]:
        """Delete what killed writers left (only the lock holder calls this); return what went."""


class _NoLock:
    """The lock of a process that does not hold one itself (ranks other than 0 of a job)."""

    def refresh(self) -> None:
        """Nothing to renew."""

    def release(self) -> None:
        """Nothing to release."""


NO_LOCK: WriterLock = _NoLock()

Backend = Callable[[str, Any], Store]
BACKENDS: dict[str, Backend] = {}


def register_backend(scheme: str, factory: Backend) -> None:
    """Make ``scheme://`` URLs open with ``factory(url, storage_options)`` (``"*"``: any other)."""
    BACKENDS[scheme] = factory


def scheme_of(path: object) -> str:
    """The URL scheme of ``path`` (``""`` for a local path; ``file://`` counts as local)."""
    if not isinstance(path, str):
        return ""
    head, sep, _ = path.partition("://")
    if not sep or not head or not all(c.isalnum() or c in "+-." for c in head):
        return ""
    scheme = head.lower()
    return "" if scheme == "file" else scheme


def open_store(root: str | os.PathLike[str], storage_options: Any = None) -> Store:
    """The store for ``root``: a local folder, or the fsspec backend for a URL.

    Raises:
        MissingExtraError, UnknownProtocolError: (URLs) fsspec or the driver is missing.
        ValueError: ``storage_options`` with a local path.
    """
    _load_backends()
    scheme = scheme_of(root)
    factory = BACKENDS.get(scheme) or BACKENDS["*"]
    return factory(os.fspath(root) if not isinstance(root, str) else root, storage_options)


def _load_backends() -> None:
    if BACKENDS:
        return
    from torchkeep.storage import fsspec_store, local  # each registers itself

    del local, fsspec_store

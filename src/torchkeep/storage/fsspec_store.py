"""A Store on any fsspec filesystem (``s3://``, ``gs://``, ``memory://`` …).

Object stores have no atomic rename, so a folder is uploaded file by file
with the manifest last, and the manifest is the commit: a folder without one
is absent to every reader, and the lock holder removes it. Replacing a child
that already exists first deletes its manifest, so a crash in between leaves
that child absent (never a mix of old and new files).

The writer lock is a *lease*: a small JSON object naming its owner (a random
token, the host, the pid) and a heartbeat time, renewed before every commit.
Another writer takes it over only when it is stale: its heartbeat is older
than the lease's time to live, or its holder is a dead process on this very
host. A writer whose lease was taken over finds out at its next commit and
raises instead of committing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torchkeep.errors import ModelFileNotFoundError, RunLockedError
from torchkeep.storage.base import register_backend
from torchkeep.storage.manifest import MANIFEST
from torchkeep.storage.remote import Remote, resolve, scratch_dir

__all__ = ["FsspecStore", "Lease"]

logger = logging.getLogger(__name__)

LEASE_TTL = 15 * 60.0  # seconds without a heartbeat after which a lease of another host is stale


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The writer's lease on a remote run (see the module docstring)."""

    def __init__(self, where: Remote, directory: str, *, ttl: float = LEASE_TTL) -> None:
        self._where = where
        self._directory = directory
        self._ttl = ttl
        self._me = {"owner": secrets.token_hex(8), "host": socket.gethostname(), "pid": os.getpid()}
        self._since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._held = False
        holder = self._read()
        if holder is not None and holder.get("owner") != self._me["owner"] and not self._stale(holder):
            raise RunLockedError(directory, holder)
        if holder is not None:
            logger.warning("taking over the stale writer lease of %s", directory)
        self._write()
        if (self._read() or {}).get("owner") != self._me["owner"]:  # another writer won the race
            raise RunLockedError(directory, self._read() or {})
        self._held = True
        # a Checkpointer dropped without close() gives its lease up when collected (or at exit)
        self._finalizer = weakref.finalize(self, _release, where, str(self._me["owner"]))

    def _read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self._where.fs.cat_file(self._where.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # a damaged lease: stale by definition (no heartbeat)
        return data if isinstance(data, dict) else {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        beat = holder.get("heartbeat")
        if not isinstance(beat, (int, float)) or time.time() - beat > self._ttl:
            return True
        pid = holder.get("pid")
        return holder.get("host") == self._me["host"] and isinstance(pid, int) and not _pid_alive(pid)

    def _write(self) -> None:
        data = {**self._me, "since": self._since, "heartbeat": time.time()}
        self._where.fs.pipe_file(self._where.path, json.dumps(data).encode())

    def refresh(self) -> None:
        """Renew the heartbeat; raise :class:`RunLockedError` if another writer took the lease."""
        holder = self._read()
        if holder is None or holder.get("owner") != self._me["owner"]:
            self._held = False
            raise RunLockedError(self._directory, holder or {})
        self._write()

    def release(self) -> None:
        """Delete the lease if it is still ours."""
        self._held = False
        self._finalizer()


def _release(where: Remote, owner: str) -> None:
    with contextlib.suppress(Exception):  # best effort: a stale lease is taken over anyway
        if json.loads(where.fs.cat_file(where.path)).get("owner") == owner:
            where.fs.rm_file(where.path)


class FsspecStore:
    """A root on an fsspec filesystem."""

    shared = False  # each rank writes into a local scratch folder and uploads its own files
    atomic_publish = False
    in_place = False

    def __init__(self, root: str, storage_options: Any = None) -> None:
        location = resolve(root, storage_options)
        if not isinstance(location, Remote):  # pragma: no cover - open_store routes paths elsewhere
            raise ValueError(f"{root} is not a URL")
        self.root = location
        self.url = location.url

    # -- reading --------------------------------------------------------------------------------
    def public(self, name: str) -> str:
        return self.root.join(name).url if name else self.url

    def name_of(self, path: str | os.PathLike[str]) -> str:
        text = os.fspath(path)
        if "://" in text:
            prefix = self.url.rstrip("/") + "/"
            if not text.startswith(prefix):
                raise ValueError(f"{text} is not a checkpoint of this run ({self.url})")
            return text[len(prefix) :].strip("/")
        return Path(text).name

    def exists(self) -> bool:
        return self.root.exists()

    def _scan(self) -> tuple[set[str], set[str]]:
        """The child folders, and those of them that hold a manifest (committed)."""
        root = self.root
        root.fs.invalidate_cache(root.path)
        try:
            paths = root.fs.find(root.path, maxdepth=2, withdirs=True)
        except FileNotFoundError:
            return set(), set()
        prefix = root.path.rstrip("/") + "/"
        folders: set[str] = set()
        committed: set[str] = set()
        for path in paths:
            parts = str(path)[len(prefix) :].split("/") if str(path).startswith(prefix) else []
            if len(parts) >= 2 and parts[0]:
                folders.add(parts[0])
                if parts[1:] == [MANIFEST]:
                    committed.add(parts[0])
        return folders, committed

    def folders(self) -> list[str]:
        """The committed child folders: one without a manifest is absent."""
        return sorted(self._scan()[1])

    def sizes(self, name: str) -> dict[str, int] | None:
        try:
            found = self.root.join(name).files()
        except FileNotFoundError:
            return None
        return found or None

    def read(self, name: str, relative: str) -> bytes:
        where = self.root.join(name, relative)
        return bytes(where.fs.cat_file(where.path))

    @contextlib.contextmanager
    def local(self, name: str) -> Iterator[Path]:
        with scratch_dir("torchkeep-restore-") as scratch:
            local = scratch / name
            local.mkdir()
            self.root.join(name).download_tree(local)
            yield local

    @contextlib.contextmanager
    def fetch(self, relative: str, *, allow_folder: bool = False) -> Iterator[Path]:
        where = self.root.join(relative) if relative else self.root
        if not where.exists():
            raise ModelFileNotFoundError(where.url)
        with scratch_dir() as scratch:
            local = scratch / where.name
            if allow_folder and where.fs.isdir(where.path):
                where.download_tree(local)
            else:
                where.download(local)
            yield local

    # -- writing --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, relative: str, *, durable: bool) -> Iterator[Path]:
        where = self.root.join(relative) if relative else self.root
        with scratch_dir() as scratch:
            local = scratch / where.name
            yield local
            where.upload(local)  # one object: visible when complete

    def lock_writer(self, name: str) -> Lease:
        return Lease(self.root.join(name), self.url)

    def begin(self, name: str) -> Path:
        folder = self.root.join(name)
        manifest = folder.join(MANIFEST)
        if manifest.exists():  # replacing: make the old one absent before any new file lands
            manifest.fs.rm_file(manifest.path)
            folder.fs.rm(folder.path, recursive=True)
            logger.info("replacing %s: the old checkpoint was removed first", folder)
        return self.scratch()

    def scratch(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="torchkeep-save-"))

    def upload_part(self, tmp: Path, name: str, files: list[Path]) -> None:
        folder = self.root.join(name)
        for path in files:
            folder.join(path.relative_to(tmp).as_posix()).upload(path)

    def publish(self, tmp: Path, name: str, *, durable: bool) -> str:
        folder = self.root.join(name)
        try:
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                relative = path.relative_to(tmp).as_posix()
                if relative != MANIFEST:
                    folder.join(relative).upload(path)
            folder.join(MANIFEST).upload(tmp / MANIFEST)  # the commit
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder.url

    def abandon(self, tmp: Path, name: str) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        folder = self.root.join(name)
        if not folder.join(MANIFEST).exists() and folder.exists():
            folder.fs.rm(folder.path, recursive=True)

    def remove(self, name: str) -> None:
        where = self.root.join(name)
        with contextlib.suppress(FileNotFoundError):
            where.fs.rm_file(where.join(MANIFEST).path)  # absent to readers first, then the files
        where.fs.rm(where.path, recursive=True)

    def remove_file(self, relative: str) -> None:
        where = self.root.join(relative)
        with contextlib.suppress(FileNotFoundError):
            where.fs.rm_file(where.path)

    def sync(self) -> None:
        """Nothing to do: an object store's deletions are done when the call returns."""

    def clean_leftovers(self, is_ours: Callable[[str], bool]) -> list[str]:
        removed = []
        folders, committed = self._scan()
        for name in sorted(folders - committed):
            if is_ours(name):
                where = self.root.join(name)
                where.fs.rm(where.path, recursive=True)
                removed.append(name)
                logger.info("removed %s left by an interrupted save", where)
        return removed


register_backend("*", FsspecStore)

"""Where a Checkpointer keeps its checkpoint folders: a local folder or a remote one (fsspec).

Both stores hand the writer a local folder to fill and then *publish* it
under its ``step-…`` name:

- :class:`LocalRun` writes in a hidden temporary folder inside the run folder
  and renames it into place (atomic; fsynced when durable).
- :class:`RemoteRun` writes in a local scratch folder and uploads it,
  ``manifest.json`` last. Object stores have no atomic rename, so the
  manifest is the commit: a checkpoint folder without one is absent to every
  reader, and the next Checkpointer on the run removes it. Replacing a step
  that already exists first deletes its manifest, so a crash in between
  leaves that step absent (never a mix of old and new files).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torchkeep.storage.atomic import discard, fsync_dir
from torchkeep.storage.manifest import MANIFEST, Verdict, check_files, parse_manifest, verify_folder
from torchkeep.storage.remote import Remote

__all__ = ["STEP_NAME", "LocalRun", "Location", "RemoteRun", "RunStore", "remove_tree", "step_name"]

logger = logging.getLogger(__name__)

STEP_NAME = re.compile(r"^step-(\d{8,})$")
Location = Path | Remote


def step_name(step: int) -> str:
    """The folder name of ``step``'s checkpoint."""
    return f"step-{step:08d}"


def remove_tree(path: Path) -> None:
    """Delete a local folder and everything in it (missing is fine)."""
    shutil.rmtree(path, ignore_errors=True)


def _files_under(folder: Path) -> list[tuple[str, Path]]:
    return sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file())


class LocalRun:
    """A run folder on a local (or network-mounted) filesystem."""

    shared = True  # every rank of a job can write into the folder that begin() returns

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.url = str(directory)
        directory.mkdir(parents=True, exist_ok=True)

    def steps(self) -> list[tuple[int, Location]]:
        found: list[tuple[int, Location]] = []
        for path in self.directory.iterdir():
            match = STEP_NAME.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
        return sorted(found, key=lambda item: item[0])

    def inspect(self, where: Location, *, checksums: bool) -> tuple[Verdict, int]:
        assert isinstance(where, Path)
        size = sum(p.stat().st_size for p in where.rglob("*") if p.is_file())
        return verify_folder(where, checksums=checksums), size

    def begin(self, name: str) -> Path:
        tmp = self.directory / f".{name}.tmp-{secrets.token_hex(4)}"
        tmp.mkdir()
        return tmp

    def scratch(self) -> Path:
        raise NotImplementedError("a local run folder is shared: every rank writes into begin()'s folder")

    def upload_part(self, tmp: Path, name: str, files: list[Path]) -> None:
        """Nothing to do: the files are already in the shared folder."""

    def publish(self, tmp: Path, name: str, *, durable: bool) -> Location:
        final = self.directory / name
        if durable:
            for sub in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
                fsync_dir(sub)
        if final.exists():
            # replace: move the old one aside first; a crash in between is undone by clean_leftovers
            old = self.directory / f".{name}.old-{secrets.token_hex(4)}"
            os.rename(final, old)
            os.rename(tmp, final)
            remove_tree(old)
        else:
            os.rename(tmp, final)
        if durable:
            fsync_dir(self.directory)
        return final

    def abandon(self, tmp: Path, name: str) -> None:
        remove_tree(tmp)

    def remove(self, where: Location) -> None:
        assert isinstance(where, Path)
        trash = self.directory / f".trash-{where.name}-{secrets.token_hex(4)}"
        os.rename(where, trash)  # vanishes at once; the space is freed in the background
        discard(trash)

    @contextlib.contextmanager
    def open(self, where: Location) -> Iterator[Path]:
        assert isinstance(where, Path)
        yield where

    def locate(self, path: str | os.PathLike[str]) -> Location:
        return Path(path)

    def clean_leftovers(self) -> None:
        for path in self.directory.iterdir():
            name = path.name
            if name.startswith(".step-") and ".old-" in name:
                original = self.directory / name[1:].split(".old-")[0]
                if not original.exists():  # killed between the two renames of a replace: put it back
                    os.rename(path, original)
                    logger.warning("recovered %s from an interrupted replace", original.name)
                    continue
            if name.startswith((".step-", ".trash-")) and path.is_dir():
                remove_tree(path)
                logger.info("removed %s left by an interrupted save", name)


class RemoteRun:
    """A run folder on an fsspec filesystem (``s3://``, ``gs://``, ``memory://`` …)."""

    shared = False  # each rank writes into a local scratch folder and uploads its own files

    def __init__(self, root: Remote) -> None:
        self.root = root
        self.url = root.url
        root.fs.makedirs(root.path, exist_ok=True)

    def _scan(self) -> tuple[set[str], set[str]]:
        """The step folders under the root, and those of them that hold a manifest (committed)."""
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
            if parts and STEP_NAME.match(parts[0]):
                folders.add(parts[0])
                if parts[1:] == [MANIFEST]:
                    committed.add(parts[0])
        return folders, committed

    def steps(self) -> list[tuple[int, Location]]:
        """The committed checkpoint folders: a folder without a manifest is absent."""
        _, committed = self._scan()
        found: list[tuple[int, Location]] = []
        for name in committed:
            match = STEP_NAME.match(name)
            assert match is not None
            found.append((int(match.group(1)), self.root.join(name)))
        return sorted(found, key=lambda item: item[0])

    def inspect(self, where: Location, *, checksums: bool) -> tuple[Verdict, int]:
        assert isinstance(where, Remote)
        sizes = where.files()
        total = sum(sizes.values())
        if MANIFEST not in sizes:
            return Verdict(False, "no manifest.json (an unfinished or damaged checkpoint)"), total
        if checksums:
            with self.open(where) as local:
                return verify_folder(local), total
        try:
            manifest = parse_manifest(where.fs.cat_file(where.join(MANIFEST).path))
        except (ValueError, UnicodeDecodeError) as err:
            return Verdict(False, f"manifest.json is not valid ({err})"), total
        except FileNotFoundError:
            return Verdict(False, "no manifest.json (an unfinished or damaged checkpoint)"), total
        return check_files(manifest, sizes.get), total

    def begin(self, name: str) -> Path:
        manifest = self.root.join(name, MANIFEST)
        if manifest.exists():  # replacing a step: make the old one absent before any new file lands
            manifest.fs.rm_file(manifest.path)
            self.root.fs.rm(self.root.join(name).path, recursive=True)
            logger.info("replacing %s: the old checkpoint was removed first", self.root.join(name))
        return self.scratch()

    def scratch(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="torchkeep-save-"))

    def upload_part(self, tmp: Path, name: str, files: list[Path]) -> None:
        """Upload some files of a rank's scratch folder (its DCP shards) into the checkpoint folder."""
        folder = self.root.join(name)
        for path in files:
            folder.join(path.relative_to(tmp).as_posix()).upload(path)

    def publish(self, tmp: Path, name: str, *, durable: bool) -> Location:
        folder = self.root.join(name)
        try:
            files = _files_under(tmp)
            for relative, path in files:
                if relative != MANIFEST:
                    folder.join(relative).upload(path)
            folder.join(MANIFEST).upload(tmp / MANIFEST)  # the commit
        finally:
            remove_tree(tmp)
        return folder

    def abandon(self, tmp: Path, name: str) -> None:
        remove_tree(tmp)
        folder = self.root.join(name)
        if not folder.join(MANIFEST).exists() and folder.exists():
            folder.fs.rm(folder.path, recursive=True)

    def remove(self, where: Location) -> None:
        assert isinstance(where, Remote)
        manifest = where.join(MANIFEST)
        with contextlib.suppress(FileNotFoundError):
            manifest.fs.rm_file(manifest.path)  # absent to readers first, then the files
        where.fs.rm(where.path, recursive=True)

    @contextlib.contextmanager
    def open(self, where: Location) -> Iterator[Path]:
        assert isinstance(where, Remote)
        local = Path(tempfile.mkdtemp(prefix="torchkeep-restore-")) / where.name
        try:
            local.mkdir()
            where.download_tree(local)
            yield local
        finally:
            remove_tree(local.parent)

    def locate(self, path: str | os.PathLike[str]) -> Location:
        text = os.fspath(path)
        if "://" in str(text):
            prefix = self.url.rstrip("/") + "/"
            if not str(text).startswith(prefix):
                raise ValueError(f"{text} is not a checkpoint of this run ({self.url})")
            return self.root.join(str(text)[len(prefix) :])
        return self.root.join(Path(text).name)

    def clean_leftovers(self) -> None:
        folders, committed = self._scan()
        for name in sorted(folders - committed):
            where = self.root.join(name)
            where.fs.rm(where.path, recursive=True)
            logger.info("removed %s left by an interrupted save", where)


RunStore = LocalRun | RemoteRun

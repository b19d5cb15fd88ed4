"""Reading a ``torch.save`` archive's data records into memory: one record (with its CRC-32),
or every stored record at once by a few threads in the background."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, cast

import torch

from torchkeep.errors import CorruptFileError
from torchkeep.safety.crc import crc32
from torchkeep.safety.ziparchive import ZipArchive, ZipMember

__all__ = ["Arena", "read_into"]

_READ_CHUNK = 64 << 20
# Below this one thread reads: the interpreter builds tensors meanwhile and needs a core of its own
# (with two readers on two cores, 2000 tensors took twice as long to build), so a second reader
# pays only for large files.
_PARALLEL_FROM = 128 << 20
# ... or from 32 MiB when records average 256 KiB or more (resnet50: 98 MiB in 320 records): the
# reader's page faults (the kernel zeroing fresh pages, ~40 ms per 100 MiB here) are most of the
# load, and two readers split them (one reader: 80 ms of a 90 ms load)
_PARALLEL_LARGE_RECORDS_FROM = 32 << 20
_LARGE_RECORD = 256 << 10
_MAX_READERS = 4
# Records this close together are read with one call: a reader thread that needs the GIL back
# after every small read made the interpreter hand it over thousands of times (2000 records)
_GROUP = 8 << 20


def read_into(f: Any, offset: int, nbytes: int) -> tuple[torch.UntypedStorage, int]:
    """Read ``nbytes`` at ``offset`` into a new storage; return it and the CRC-32 of the bytes."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    view = buffer.numpy().data if nbytes else memoryview(b"")
    f.seek(offset)
    crc = 0
    done = 0
    while done < nbytes:
        chunk = view[done : done + _READ_CHUNK]
        got = f.readinto(chunk)
        if not got:
            break
        crc = crc32(chunk[:got], crc)
        done += got
    if done != nbytes:
        raise EOFError(f"read {done} of {nbytes} bytes")
    return buffer.untyped_storage(), crc


class Arena:
    """Every stored data record of an archive, read into one buffer in the background.

    One allocation and large reads instead of one of each per tensor. The
    records are split into a few runs of about equal size, each read by its
    own thread (page faults of the new buffer then happen on every core; two
    threads halved a 1 GiB read here) which also checks each record's CRC-32
    right after reading it, while it is in the cache. The buffer has ordinary
    pages: a huge-page buffer filled 64 MiB in 15 ms instead of 40 in a quiet
    process, but in fresh processes beside others that allocate and free
    memory its loads were bimodal (resnet50: median 253 ms against 102 ms with
    ordinary pages, 2000 small tensors 214 against 115). Reads and CRCs release
    the GIL, so the interpreter meanwhile builds tensors on slices of the
    buffer: slices are separate storages of exactly their record's size that
    keep the buffer alive. :meth:`finish` waits and raises what the threads found.
    """

    def __init__(self, path: Path, archive: ZipArchive, members: list[ZipMember]) -> None:
        self._path = path
        self._archive = archive
        ordered = sorted(members, key=lambda m: m.data_offset)
        self.start = ordered[0].data_offset
        length = ordered[-1].data_offset + ordered[-1].size - self.start
        self.storage = torch.empty(length, dtype=torch.uint8).untyped_storage()
        self._view = torch.empty(0, dtype=torch.uint8).set_(self.storage).numpy().data
        self._stop = False
        self._finished = False
        self._errors: list[Exception] = []
        # small records read in groups: their CRCs are checked by finish(), on the caller's thread,
        # once the interpreter is done; checked by the reader, each CRC call gave up the GIL and
        # waited for the interpreter to hand it back (the read of 2000 records then outlasted it)
        self._small: list[ZipMember] = []
        self._threads = [
            threading.Thread(target=self._guard, args=(run,), name="torchkeep-read", daemon=True)
            for run in _runs(ordered, _reader_count(length, len(ordered)))
        ]
        for thread in self._threads:
            thread.start()

    def slice(self, member: ZipMember) -> torch.UntypedStorage:
        begin = member.data_offset - self.start
        return cast(torch.UntypedStorage, self.storage[begin : begin + member.size])

    def _guard(self, run: list[ZipMember]) -> None:
        try:
            self._read(run)
        except Exception as err:  # handed to the caller by finish()
            self._errors.append(err)
            self._stop = True

    def _read(self, run: list[ZipMember]) -> None:
        fd = os.open(self._path, os.O_RDONLY)
        try:
            i = 0
            while i < len(run) and not self._stop:
                j = i  # small records that follow each other: one read for all, then their CRCs
                while j + 1 < len(run) and _end(run[j + 1]) - run[i].data_offset <= _GROUP:
                    j += 1
                if j == i:
                    self._read_one(fd, run[i])
                else:  # their CRCs: by finish(), on the caller's thread (see _small)
                    self._fill(fd, run[i].data_offset, _end(run[j]))
                    self._small.extend(run[i : j + 1])
                i = j + 1
        finally:
            os.close(fd)

    def _fill(self, fd: int, lo: int, hi: int) -> None:
        """Read the file's bytes ``lo..hi`` (headers between records included) into the buffer."""
        done = lo
        while done < hi:
            chunk = self._view[done - self.start : min(hi, done + _READ_CHUNK) - self.start]
            got = os.preadv(fd, [chunk], done)
            if not got:
                raise CorruptFileError(self._path, "the file ended while its tensor data was read")
            done += got

    def _read_one(self, fd: int, member: ZipMember) -> None:
        """A large record in chunks, each CRC-checked right after its read while it is in the cache."""
        begin = member.data_offset - self.start
        crc = 0
        done = 0
        while done < member.size:
            if self._stop:
                return
            chunk = self._view[begin + done : begin + min(member.size, done + _READ_CHUNK)]
            got = os.preadv(fd, [chunk], member.data_offset + done)
            if not got:
                raise CorruptFileError(self._path, "the file ended while its tensor data was read")
            crc = crc32(chunk[:got], crc)
            done += got
        self._archive.check_crc(member, crc)

    def finish(self, *, abort: bool = False) -> None:
        """Wait for the reads and checks; raise the first error they hit (unless aborting)."""
        if self._finished:
            return
        self._finished = True
        if abort:
            self._stop = True
        for thread in self._threads:
            thread.join()
        try:
            if not self._errors and not abort:
                for member in self._small:
                    begin = member.data_offset - self.start
                    self._archive.check_crc(member, crc32(self._view[begin : begin + member.size]))
        finally:
            self._view.release()
        if self._errors and not abort:
            raise self._errors[0]


def _end(member: ZipMember) -> int:
    return member.data_offset + member.size


def _reader_count(length: int, records: int) -> int:
    cores = max(1, min(_MAX_READERS, os.cpu_count() or 1))
    if length >= _PARALLEL_FROM:
        return cores
    if length >= _PARALLEL_LARGE_RECORDS_FROM and length >= records * _LARGE_RECORD:
        return min(2, cores)  # few large records: the interpreter is done early, a second core is free
    return 1


def _runs(members: list[ZipMember], count: int) -> list[list[ZipMember]]:
    """``members`` (in file order) cut into at most ``count`` consecutive runs of about equal bytes."""
    total = sum(m.size for m in members)
    runs: list[list[ZipMember]] = [[]]
    filled = 0
    for member in members:
        if runs[-1] and filled >= total * len(runs) / count and len(runs) < count:
            runs.append([])
        runs[-1].append(member)
        filled += member.size
    return runs

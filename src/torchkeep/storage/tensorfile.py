"""Writing safetensors files in one pass, straight from each tensor's memory.

The safetensors library's ``save_file`` first copies every tensor into a
``bytes`` object; this writer hands the tensors' own memory to ``os.writev``
in large batches, so a save costs what the kernel's copy into the page cache
costs and nothing more. A digest of the file (XXH3-128 or SHA-256) can be computed on a second
thread from the same memory while it is written (both hash libraries release the GIL),
instead of reading the file back afterwards.

The file is a standard safetensors file: an 8-byte little-endian header
length, a JSON header padded with spaces to a multiple of 8, then the tensors'
bytes in header order, each range following the previous one. Tensors are
ordered by item size, largest first, so each starts aligned to its item size.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import re
import struct
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from torchkeep.errors import UnsupportedDtypeError
from torchkeep.storage.manifest import new_digest

if TYPE_CHECKING:
    from torchkeep.formats import SafetensorsHeader

__all__ = [
    "ChosenWrite",
    "WriteResult",
    "parallel_read",
    "read_safetensors",
    "safetensors_layout",
    "write_chosen",
    "write_safetensors",
]

_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
# Bytes per writev call: large enough to cost nothing per call, small enough that the
# hashing thread works on one batch while the next is written (Linux caps a write at ~2 GiB).
_MAX_WRITE = 64 << 20
_HASH_BATCH = 8 << 20
_HASH_VIEWS = 4096  # and at most this many views a batch (small tensors)
# write_chosen's helper prepares (hashes) only candidates of at least this size: xxhash holds
# the GIL for smaller inputs, where a second thread made 64 KiB pieces slower, not faster.
_SHARED_MIN = 256 << 10


def _codes() -> dict[torch.dtype, str]:
    from torchkeep.formats import SAFETENSORS_DTYPES

    codes = {}
    for code, (name, _bits) in SAFETENSORS_DTYPES.items():
        dtype = getattr(torch, name.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype) and code not in {"F4"}:
            codes[dtype] = code
    return codes


_TORCH_TO_CODE = _codes()


@dataclass(frozen=True)
class WriteResult:
    """What was written: total bytes, the file's digest and the non-finite tensors, when asked for."""

    size: int
    digest: str | None
    nonfinite: list[str] = field(default_factory=list)


def _byte_view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a memoryview over its own memory (no copy)."""
    flat = t.reshape(-1).view(torch.uint8)
    return flat.numpy().data


_PLAIN = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII but '"' and '\\': JSON writes it as it is


def _header(
    entries: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None,
    *,
    room: int | None = None,
) -> bytearray:
    """A safetensors header for ``entries`` (name, tensor; their data laid out in this order):
    the 8-byte length, then the JSON (as ``json.dumps`` of the whole table would write it),
    padded with spaces to a multiple of 8, or to ``room`` bytes in all.

    Written piece by piece into one buffer, so a header of 100k tensors costs its own bytes, not a
    dict, two lists and three copies of the text per tensor.

    Raises:
        KeyError: a tensor's dtype has no safetensors code (callers check dtypes first).
        ValueError: the header is larger than ``room``.
    """
    out = bytearray(8)
    out += b"{"
    if metadata:
        table = json.dumps(dict(metadata), separators=(",", ":"), ensure_ascii=False)
        out += f'"__metadata__":{table}'.encode()
    offset = 0
    for name, t in entries:
        if len(out) > 9:
            out += b","
        quoted = f'"{name}"' if _PLAIN.fullmatch(name) else json.dumps(name, ensure_ascii=False)
        shape = ",".join(map(str, t.shape))
        end = offset + t.nbytes
        code = _TORCH_TO_CODE[t.dtype]
        out += f'{quoted}:{{"dtype":"{code}","shape":[{shape}],"data_offsets":[{offset},{end}]}}'.encode()
        offset = end
    out += b"}"
    size = len(out) + (-len(out) % 8) if room is None else room
    if len(out) > size:
        raise ValueError(f"a safetensors header of {len(out)} bytes does not fit the {size} kept for it")
    out += b" " * (size - len(out))
    out[:8] = struct.pack("<Q", size - 8)
    return out


def _by_item_size(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Positions of ``tensors`` in the order their data is laid out: largest item size first
    (stable), so each tensor starts aligned to its item size."""
    return sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())


def safetensors_layout(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> tuple[bytearray, list[torch.Tensor]]:
    """The header bytes (length prefix included) and the tensors in the order their data follows.

    Raises:
        KeyError: a tensor's dtype has no safetensors code (callers check dtypes first).
    """
    names = list(tensors)
    values = list(tensors.values())
    order = _by_item_size(values)
    return _header(((names[i], values[i]) for i in order), metadata), [values[i] for i in order]


def _batches(views: Iterable[memoryview]) -> Iterator[list[memoryview]]:
    """Group views into writev calls of at most IOV_MAX views and about ``_MAX_WRITE`` bytes,
    made as they are consumed (a save of 100k tensors never holds a view of each at once)."""
    current: list[memoryview] = []
    size = 0
    for view in views:
        for start in range(0, max(len(view), 1), _MAX_WRITE):
            part = view[start : start + _MAX_WRITE]
            if current and (len(current) >= _IOV_MAX or size + len(part) > _MAX_WRITE):
                yield current
                current, size = [], 0
            current.append(part)
            size += len(part)
    if current:
        yield current


def _write_all(fd: int, batch: list[memoryview]) -> None:
    while batch:
        written = os.writev(fd, batch)
        while batch and written >= len(batch[0]):
            written -= len(batch[0])
            batch = batch[1:]
        if batch and written:
            batch = [batch[0][written:], *batch[1:]]


def _finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN/Inf, without a temporary of its size.

    ``min``/``max`` propagate NaN, and an infinity is an extreme: one reduction
    pass, no allocation (``isfinite`` would make three full-size temporaries).
    """
    flat = t.reshape(-1)
    try:
        low, high = torch.aminmax(flat)
    except (RuntimeError, NotImplementedError):  # dtypes without a reduction (float8): in slices
        step = 1 << 20
        parts = (flat[i : i + step] for i in range(0, flat.numel(), step))
        return all(bool(part.float().isfinite().all()) for part in parts)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _nonfinite(tensors: list[tuple[str, torch.Tensor]]) -> list[str]:
    # the reductions release the GIL like the hashers, so they run beside the writes
    return [name for name, t in tensors if t.is_floating_point() and t.numel() and not _finite(t)]


class _Hasher:
    """A digest of a byte stream (and a NaN/Inf check), computed on a second thread from the
    writer's own memory.

    At most a few batches wait for it (``feed`` blocks meanwhile), so the writer never holds a
    view of every tensor of a large save at once.
    """

    def __init__(self, algorithm: str | None, finite: list[tuple[str, torch.Tensor]]) -> None:
        self.digest = new_digest(algorithm) if algorithm else None
        self.nonfinite: list[str] = []
        self._finite = finite
        self._error: BaseException | None = None
        self._queue: queue.Queue[list[memoryview] | None] = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._run, name="torchkeep-digest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self.digest is not None and self._error is None:
                try:
                    for view in batch:
                        self.digest.update(view)
                except BaseException as err:  # kept for finish(); the queue is still drained
                    self._error = err
        if self._error is None:
            self.nonfinite = _nonfinite(self._finite)  # the bytes are hot in the cache by now

    def feed(self, batch: list[memoryview]) -> None:
        self._queue.put(batch)

    def finish(self) -> str | None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return None if self.digest is None else str(self.digest.hexdigest())


class _Feeder:
    """Hands what was written to a :class:`_Hasher` in batches of about ``_HASH_BATCH`` bytes."""

    def __init__(self, hasher: _Hasher | None) -> None:
        self.hasher = hasher
        self._pending: list[memoryview] = []
        self._size = 0

    def add(self, batch: list[memoryview]) -> None:
        if self.hasher is None:
            return
        self._pending += batch
        self._size += sum(len(v) for v in batch)
        if self._size >= _HASH_BATCH or len(self._pending) >= _HASH_VIEWS:
            self.hasher.feed(self._pending)
            self._pending, self._size = [], 0

    def finish(self) -> tuple[str | None, list[str]]:
        if self.hasher is None:
            return None, []
        self.hasher.feed(self._pending)
        self._pending = []
        return self.hasher.finish(), self.hasher.nonfinite


def write_safetensors(
    fd: int,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    digest: str | None = None,
    fsync: bool = False,
    check_finite: bool = False,
    only: Collection[str] | None = None,
) -> WriteResult:
    """Write ``tensors`` (contiguous CPU tensors) as a safetensors file to the open descriptor ``fd``.

    Args:
        fd (int): a file descriptor open for writing, at offset 0.
        tensors (Mapping[str, Tensor]): contiguous CPU tensors, each owning its bytes.
        metadata (Mapping[str, str] | None, default None): the ``__metadata__`` table.
        digest (str | None, default None): also compute the file's digest with
            this algorithm (``"xxh3_128"``, ``"sha256"``), in parallel.
        fsync (bool, default False): fsync ``fd`` once written (the hash
            finishes meanwhile).
        check_finite (bool, default False): also list the floating-point
            tensors holding NaN or Inf (on the hashing thread, beside the writes).
        only (Collection[str] | None, default None): with ``check_finite``,
            look at these tensors only (None: all).

    Returns:
        A :class:`WriteResult`.
    """
    header, ordered = safetensors_layout(tensors, metadata)
    views = itertools.chain((memoryview(header),), (_byte_view(t) for t in ordered if t.numel()))
    finite = [(n, t) for n, t in tensors.items() if only is None or n in only] if check_finite else []
    feeder = _Feeder(_Hasher(digest, finite) if digest or check_finite else None)
    try:
        for batch in _batches(views):
            _write_all(fd, batch)
            feeder.add(batch)  # hashed while the next batch is written
        if fsync:
            os.fsync(fd)
    finally:
        hexdigest, nonfinite = feeder.finish()
    return WriteResult(len(header) + sum(t.nbytes for t in ordered), hexdigest, nonfinite)


class _FromBothEnds:
    """Runs ``prepare`` once on every position of ``order``: the caller first does the positions
    not ``shared`` (in the constructor), then walks the order from the front (:meth:`take`)
    while a helper thread walks the shared positions from the back, until they meet.

    Work that releases the GIL (hashing a large tensor) thus runs on two cores while the
    caller keeps the order's decisions sequential. Positions not shared (small tensors, whose
    work is mostly Python that holds the GIL) go first, alone: done among the large ones, or
    while the helper ran, they passed the GIL to and fro (hashing resnet50's 279 small tensors
    took 3.8 ms beside the helper, 1.7 ms before it; done one by one among the large ones, two
    threads were slower than one). ``take`` must be called for each position in order.
    """

    def __init__(self, order: list[int], shared: list[bool], prepare: Callable[[int], object]) -> None:
        self._order = order
        self._prepare = prepare
        self._shared = [k for k in range(len(order)) if shared[k]]  # positions, ascending
        self._rank = {k: r for r, k in enumerate(self._shared)}
        self._lock = threading.Lock()
        self._front = 0  # shared positions of rank below it are the caller's
        self._back = len(self._shared)  # those of rank from it on are the helper's
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="torchkeep-prepare", daemon=True)
        for k, i in enumerate(order):
            if not shared[k]:
                prepare(i)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._back <= self._front:
                        return
                    self._back -= 1
                    k = self._shared[self._back]
                self._prepare(self._order[k])
        except BaseException as err:  # raised to the caller by take()
            self._error = err

    def take(self, k: int) -> None:
        """Prepare position ``k`` of the order (the next one), or wait until the helper has."""
        rank = self._rank.get(k)
        if rank is None:  # prepared by the constructor
            return
        with self._lock:
            mine = rank < self._back  # else the helper holds it, and every shared position after it
            if mine:
                self._front = rank + 1
        if mine:
            self._prepare(self._order[k])
            return
        self._thread.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the helper after its current position, and wait for it."""
        with self._lock:
            self._back = self._front
        self._thread.join()


def _helpers() -> int:
    """CPUs this process may run on, beyond its own thread."""
    try:
        return len(os.sched_getaffinity(0)) - 1
    except AttributeError:  # not Linux
        return (os.cpu_count() or 1) - 1


@dataclass(frozen=True)
class ChosenWrite:
    """What :func:`write_chosen` did: each candidate's name in the file (``None``: left out), and
    the file written (``None``: no candidate was chosen, no file opened)."""

    names: list[str | None]
    result: WriteResult | None


class _BatchWriter:
    """Writes batches of tensors (positions in ``tensors``) to ``fd`` on a thread of its own, in
    the order they are handed over, while the caller goes on choosing."""

    def __init__(self, fd: int, tensors: Sequence[torch.Tensor]) -> None:
        self._fd = fd
        self._tensors = tensors
        self._queue: queue.Queue[list[int] | None] = queue.Queue()  # views are made as written
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="torchkeep-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._error is None and not self._cancelled:
                try:
                    _write_positions(self._fd, self._tensors, batch)
                except BaseException as err:  # raised to the caller by put() or finish()
                    self._error = err

    def put(self, batch: list[int]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(batch)

    def finish(self) -> None:
        """Wait until everything handed over is written; raise what the writes raised."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Skip what is still queued (the file is being abandoned) and wait for the thread."""
        self._cancelled = True
        self._queue.put(None)
        self._thread.join()


def _write_positions(fd: int, tensors: Sequence[torch.Tensor], batch: list[int]) -> None:
    for views in _batches(_byte_view(tensors[i]) for i in batch if tensors[i].numel()):
        _write_all(fd, views)


def write_chosen(
    open_fd: Callable[[], int],
    tensors: Sequence[torch.Tensor],
    choose: Callable[[int, torch.Tensor], str | None],
    metadata: Mapping[str, str] | None = None,
    *,
    name_length: int,
    prepare: Callable[[int, torch.Tensor], object] | None = None,
    unprepared: Collection[int] | None = None,
    digest: str | None = None,
    check_finite: Collection[int] = (),
) -> ChosenWrite:
    """Write the candidates that ``choose`` names as a safetensors file, deciding while writing.

    ``choose(i, tensor)`` runs on the calling thread, candidate by candidate
    in the order their data is laid out (largest item size first), and
    returns the name the tensor gets in the file or ``None`` to leave it out
    (e.g. its content digest, or ``None`` when that content is stored
    already). Once about ``_HASH_BATCH`` bytes are chosen, a second thread
    starts writing them, batch by batch, so the choosing (hashing every
    candidate) overlaps the writing instead of preceding it; when less is
    chosen (a frozen model's save) it is written at the end, with no thread.
    The header, known once every candidate is decided, goes last into room
    kept at the start of the file when the first batch is written: for the
    chosen so far and every candidate not yet decided (the unused rest is
    padding spaces, which the safetensors format allows), or exactly its
    size when everything was decided before. ``prepare(i, tensor)``, if
    given, runs once for each candidate (each of ``unprepared``, if given)
    before ``choose`` sees it, on the calling thread or (where the process
    has a second CPU, for candidates of at least 256 KiB) on a helper thread
    that works from the end of the order: the place for work that releases
    the GIL, such as hashing. The calling thread then computes the file's
    ``digest`` from the tensors' memory, beside the last writes, and checks
    the candidates at ``check_finite`` that were chosen for NaN/Inf.

    ``open_fd`` is called, once, before the first batch is written: nothing
    is opened when no candidate is chosen. Every name must be
    ``name_length`` characters of JSON-plain text (hex digests are).

    Raises:
        ValueError: a name chosen twice, of another length, or one JSON would escape.
        Whatever ``prepare``, ``choose`` or the writes raised (every thread is joined first).
    """
    order = _by_item_size(tensors)
    placeholder = "0" * name_length  # the header can only shrink as candidates are left out
    names: list[str | None] = [None] * len(tensors)
    chosen: list[tuple[str, torch.Tensor]] = []
    taken: set[str] = set()
    room: int | None = None
    fd: int | None = None
    writer: _BatchWriter | None = None
    ahead: _FromBothEnds | None = None
    batch: list[int] = []
    pending = size = 0

    def start_file(room: int) -> int:
        fd = open_fd()
        os.lseek(fd, room, os.SEEK_SET)  # the header goes before, once known
        return fd

    try:
        todo = [i for i in order if unprepared is None or i in unprepared] if prepare is not None else []
        positions = {i: k for k, i in enumerate(todo)}  # the candidates to prepare, in order
        shared = [tensors[i].nbytes >= _SHARED_MIN for i in todo]
        if prepare is not None and sum(shared) > 1 and _helpers():
            ahead = _FromBothEnds(todo, shared, lambda i: prepare(i, tensors[i]))
        for k, i in enumerate(order):
            if (position := positions.get(i)) is not None:
                if ahead is not None:
                    ahead.take(position)
                elif prepare is not None:
                    prepare(i, tensors[i])
            name = names[i] = choose(i, tensors[i])
            if name is None:
                continue
            if len(name) != name_length or not _PLAIN.fullmatch(name) or name in taken:
                raise ValueError(
                    f"write_chosen: {name!r} is not a new name of {name_length} plain characters"
                )
            taken.add(name)
            chosen.append((name, tensors[i]))
            batch.append(i)
            pending += tensors[i].nbytes
            if pending >= _HASH_BATCH:  # enough to start writing: keep room for what may follow
                if writer is None:
                    rest = ((placeholder, tensors[j]) for j in order[k + 1 :])
                    room = len(_header(itertools.chain(chosen, rest), metadata))
                    fd = start_file(room)
                    writer = _BatchWriter(fd, tensors)
                writer.put(batch)
                size += pending
                batch, pending = [], 0
        if ahead is not None:
            ahead.close()
            ahead = None
        if not chosen:
            return ChosenWrite(names, None)
        if fd is None:  # all decided before any write: the header's exact size
            room = len(_header(chosen, metadata))
            fd = start_file(room)
        if batch:
            if writer is not None:
                writer.put(batch)
            else:
                _write_positions(fd, tensors, batch)
        size += pending
        header = _header(chosen, metadata, room=room)
        file_digest = None
        if digest is not None:
            hasher = new_digest(digest)
            hasher.update(header)
            for _, t in chosen:
                if t.numel():
                    hasher.update(_byte_view(t))
            file_digest = str(hasher.hexdigest())
        nonfinite = _nonfinite([(name, tensors[i]) for i in check_finite if (name := names[i]) is not None])
        if writer is not None:
            done, writer = writer, None
            done.finish()
        os.pwrite(fd, header, 0)
        return ChosenWrite(names, WriteResult(len(header) + size, file_digest, nonfinite))
    finally:
        try:
            if ahead is not None:
                ahead.close()
        finally:
            if writer is not None:  # an error is on its way out: the file will be abandoned
                writer.cancel()


_READ_CHUNK = 64 << 20


def read_safetensors(
    path: Path,
    header: SafetensorsHeader,
    *,
    device: torch.device,
    mmap: bool,
    names: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose ``header`` was checked (tiling, sizes, dtypes).

    With ``mmap`` the file is mapped privately and each tensor is a view of
    its bytes: nothing is read until used, and for another device each tensor
    is copied from the mapping straight to it. Without, the data section is
    read into one buffer with a few large reads, and each tensor is a slice of
    it (a storage of exactly its own size). ``names`` (mapped reads only)
    makes only those tensors.
    """
    if mmap:
        size = header.data_start + sum(t.nbytes for t in header.tensors)
        whole = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
        base = header.data_start
    else:
        length = sum(t.nbytes for t in header.tensors)
        buffer = torch.empty(length, dtype=torch.uint8)
        if length:
            parallel_read(path, header.data_start, buffer.numpy().data)
        whole = buffer.untyped_storage()
        base = 0
    out: dict[str, torch.Tensor] = {}
    for info in header.tensors:
        if mmap and names is not None and info.name not in names:
            continue
        dtype = getattr(torch, info.dtype.removeprefix("torch."))
        if math.prod(info.shape) * dtype.itemsize != info.nbytes:  # packed sub-byte dtypes
            raise UnsupportedDtypeError(info.name, info.dtype)
        start = base + info.offset
        storage = whole[start : start + info.nbytes]
        t = torch.empty((0,), dtype=dtype).set_(storage, 0, info.shape, _contiguous_strides(info.shape))
        out[info.name] = t if device.type == "cpu" else t.to(device)
    return out


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


_PARALLEL_FROM = 32 << 20
_MAX_READERS = 4


def parallel_read(path: Path, offset: int, view: memoryview) -> None:
    """Fill ``view`` with the file's bytes from ``offset``, with a few threads for large reads.

    The page faults of a fresh buffer are most of the cost of reading from the
    page cache, and they run on every core when each thread fills its own part
    (two threads halved a 1 GiB read on a 2-core machine).

    Raises:
        EOFError: the file is shorter than ``offset + len(view)``.
    """
    length = len(view)
    count = 1 if length < _PARALLEL_FROM else max(1, min(_MAX_READERS, os.cpu_count() or 1))
    step = -(-length // count)
    errors: list[BaseException] = []

    def part(lo: int, hi: int) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                done = lo
                while done < hi:
                    got = os.preadv(fd, [view[done : min(hi, done + _READ_CHUNK)]], offset + done)
                    if not got:
                        raise EOFError(f"{path} ended after {done} of {length} bytes of tensor data")
                    done += got
            finally:
                os.close(fd)
        except BaseException as err:
            errors.append(err)

    threads = [
        threading.Thread(target=part, args=(i * step, min(length, (i + 1) * step)), name="torchkeep-read")
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]

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

import json
import math
import os
import queue
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchkeep.errors import UnsupportedDtypeError
from torchkeep.storage.manifest import new_digest

if TYPE_CHECKING:
    from torchkeep.formats import SafetensorsHeader

__all__ = ["WriteResult", "parallel_read", "read_safetensors", "safetensors_layout", "write_safetensors"]

_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
# Bytes per writev call: large enough to cost nothing per call, small enough that the
# hashing thread works on one batch while the next is written (Linux caps a write at ~2 GiB).
_MAX_WRITE = 64 << 20
_HASH_BATCH = 8 << 20


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


def safetensors_layout(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[torch.Tensor]]:
    """The header bytes (length prefix included) and the tensors in the order their data follows.

    Raises:
        KeyError: a tensor's dtype has no safetensors code (callers check dtypes first).
    """
    order = sorted(tensors.items(), key=lambda kv: -kv[1].element_size())  # stable: ties keep their order
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, t in order:
        header[name] = {
            "dtype": _TORCH_TO_CODE[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, [t for _, t in order]


def _batches(views: list[memoryview]) -> list[list[memoryview]]:
    """Group views into writev calls: at most IOV_MAX views and about 1 GiB each."""
    batches: list[list[memoryview]] = []
    current: list[memoryview] = []
    size = 0
    for view in views:
        for start in range(0, max(len(view), 1), _MAX_WRITE):
            part = view[start : start + _MAX_WRITE]
            if current and (len(current) >= _IOV_MAX or size + len(part) > _MAX_WRITE):
                batches.append(current)
                current, size = [], 0
            current.append(part)
            size += len(part)
    if current:
        batches.append(current)
    return batches


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
    writer's own memory."""

    def __init__(self, algorithm: str | None, finite: list[tuple[str, torch.Tensor]]) -> None:
        self.digest = new_digest(algorithm) if algorithm else None
        self.nonfinite: list[str] = []
        self._finite = finite
        self._queue: queue.Queue[list[memoryview] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="torchkeep-digest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self.digest is not None:
                for view in batch:
                    self.digest.update(view)
        self.nonfinite = _nonfinite(self._finite)  # the bytes are hot in the cache by now

    def feed(self, batch: list[memoryview]) -> None:
        self._queue.put(batch)

    def finish(self) -> str | None:
        self._queue.put(None)
        self._thread.join()
        return None if self.digest is None else str(self.digest.hexdigest())


def write_safetensors(
    fd: int,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    digest: str | None = None,
    fsync: bool = False,
    check_finite: bool = False,
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

    Returns:
        A :class:`WriteResult`.
    """
    header, ordered = safetensors_layout(tensors, metadata)
    views = [memoryview(header), *(_byte_view(t) for t in ordered if t.numel())]
    finite = [(name, t) for name, t in tensors.items()] if check_finite else []
    hasher = _Hasher(digest, finite) if digest or check_finite else None
    pending: list[memoryview] = []
    pending_size = 0
    try:
        for batch in _batches(views):
            _write_all(fd, batch)
            if hasher is not None:  # hash what was just written while the next batch is written
                pending += batch
                pending_size += sum(len(v) for v in batch)
                if pending_size >= _HASH_BATCH:
                    hasher.feed(pending)
                    pending, pending_size = [], 0
        if fsync:
            os.fsync(fd)
    finally:
        hexdigest, nonfinite = None, []
        if hasher is not None:
            hasher.feed(pending)
            hexdigest = hasher.finish()
            nonfinite = hasher.nonfinite
    return WriteResult(len(header) + sum(t.nbytes for t in ordered), hexdigest, nonfinite)


_READ_CHUNK = 64 << 20


def read_safetensors(
    path: Path, header: SafetensorsHeader, *, device: torch.device, mmap: bool
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose ``header`` was checked (tiling, sizes, dtypes).

    With ``mmap`` the file is mapped privately and each tensor is a view of
    its bytes: nothing is read until used, and for another device each tensor
    is copied from the mapping straight to it. Without, the data section is
    read into one buffer with a few large reads, and each tensor is a slice of
    it (a storage of exactly its own size).
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

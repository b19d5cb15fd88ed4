"""Writing ``torch.save`` zip files in one pass, straight from each tensor's memory.

``torch.save`` pickles every tensor through Python (``__reduce_ex__``, a
persistent id per storage: ~50 us a tensor) and hands each storage to its zip
writer one record at a time. This writer emits the same archive itself: the
pickle of a ``dict[str, Tensor]`` is put together from a few byte strings per
tensor, and the records go to ``os.writev`` in large batches from the
storages' own memory, while a second thread computes their CRC-32s (ISA-L
releases the GIL) a few groups of records ahead of the writes.

A save streams: the pickle is written as it is made (its header rewritten in
place at the end), each group's memoryviews live until the group is written,
and each record leaves 20 bytes for the central directory (CRC, size, offset),
which is packed in pieces at the end. A save of 100k 1 KiB tensors peaks at
~20 MiB besides the state dict (it was ~160 MiB with every view, header and
directory entry held to the end); a million peak at ~100 MiB, 61 of them the
Python object torch makes (and keeps while the tensor lives) for each storage
asked for, which any writer of this format asks for.

The archive is what ``torch.save`` writes for the same dict: the records
``data.pkl``, ``.format_version``, ``.storage_alignment``, ``byteorder``,
``data/<key>`` for each storage (its data 64-byte aligned by an ``FB`` padding
field, as torch aligns it), ``version`` and ``.data/serialization_id``, under a
root folder named after the file, then a zip64 end record as torch writes it.
The pickle uses the opcodes ``torch.save`` uses (protocol 2): a tensor is
``torch._utils._rebuild_tensor_v2`` on a typed storage, or ``_rebuild_tensor_v3``
with its dtype for dtypes without a storage class (``uint16``, float8, ...).
A tensor object met twice is pickled once and referenced (it loads as one
object, as with ``torch.save``); tensors sharing a storage share its record.
Records carry no data descriptors: each CRC is in its local header, so
readers that compare the local header with the directory see one story.
"""

from __future__ import annotations

import os
import secrets
import struct
import zipfile
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from torchkeep.safety.crc import crc32
from torchkeep.storage.tensorfile import _batches, _write_all

__all__ = ["archive_root", "pickle_state_dict", "save_torch_zip", "write_torch_zip"]

_ALIGN = 64
_U32_MAX = 0xFFFFFFFF
_FLAG_UTF8 = 0x800
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_ZIP64_EXTRA = struct.Struct("<HHQQ")
_ZIP64_EXTRA_OFFSET = struct.Struct("<HHQQQ")
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")
_LOCATOR = struct.Struct("<4sIQI")
_EOCD = struct.Struct("<4sHHHHIIH")

_STORAGE_CLASS = dict(torch.storage._dtype_to_storage_type_map())


def save_torch_zip(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], *, records: Mapping[str, bytes]
) -> None:
    """Write ``tensors`` to a new file at ``path`` as ``torch.save`` would, plus ``records`` under its root.

    Plain tensors go through :func:`write_torch_zip`; a dict holding what it
    does not express (quantized tensors, tensor subclasses) is saved by
    ``torch.save`` itself and the records appended.
    """
    if all(type(t) is torch.Tensor and not t.is_quantized for t in tensors.values()):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_torch_zip(fd, tensors, root=archive_root(path), records=records)
        finally:
            os.close(fd)
        return
    torch.save(dict(tensors), path)
    if records:
        with zipfile.ZipFile(path, "a") as archive:
            root = archive.namelist()[0].split("/", 1)[0]
            for name, raw in records.items():
                archive.writestr(f"{root}/{name}", raw)


def archive_root(path: str | os.PathLike[str]) -> str:
    """The root folder ``torch.save`` gives the records of a file at ``path``: its name to the first dot."""
    return Path(path).name.split(".", 1)[0] or "archive"


# -- the pickle ------------------------------------------------------------------------------------


class _Pickle:
    """Protocol-2 opcodes for a dict of tensors, with memo slots for repeated globals and strings."""

    def __init__(self) -> None:
        self.parts: list[bytes] = [b"\x80\x02}q\x00("]  # PROTO 2, EMPTY_DICT, BINPUT 0, MARK
        self.memo: dict[object, bytes] = {}
        self.next = 1
        self.tensor_codes: dict[torch.dtype, tuple[bytes, bytes, bytes, int]] = {}

    def _put(self) -> bytes:
        index = self.next
        self.next += 1
        return b"q" + bytes((index,)) if index < 256 else b"r" + struct.pack("<I", index)

    def _get(self, index_code: bytes) -> bytes:
        # a BINPUT/LONG_BINPUT slot as the matching BINGET/LONG_BINGET
        return (b"h" if index_code[:1] == b"q" else b"j") + index_code[1:]

    def cached(self, key: object, code: bytes) -> bytes:
        """``code`` the first time (memoized), a memo get after."""
        slot = self.memo.get(key)
        if slot is not None:
            return slot
        put = self._put()
        self.memo[key] = self._get(put)
        return code + put

    def global_(self, module: str, name: str) -> bytes:
        return self.cached((module, name), f"c{module}\n{name}\n".encode())

    def string(self, text: str) -> bytes:
        return self.cached(("str", text), _unicode(text))

    def remember(self) -> tuple[bytes, bytes]:
        """A new memo slot: (the put to emit now, the get to emit later)."""
        put = self._put()
        return put, self._get(put)


def _unicode(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


_SMALL_INTS = [b"K" + bytes((i,)) for i in range(256)]


def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return _SMALL_INTS[value]
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    if -(1 << 31) <= value < 1 << 31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes((len(raw),)) + raw  # LONG1


def _tuple(values: tuple[int, ...]) -> bytes:
    body = b"".join([_int(v) for v in values])
    n = len(values)
    if n == 0:
        return b")"
    if n <= 3:
        return body + (b"\x85", b"\x86", b"\x87")[n - 1]
    return b"(" + body + b"t"


def pickle_state_dict(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[bytes, list[torch.UntypedStorage]]:
    """The ``data.pkl`` that ``torch.save`` writes for ``tensors``, and the storages in key order.

    Each tensor is a CPU tensor; tensors on one storage must share its dtype
    (``torch.save`` refuses the same mix).

    Raises:
        ValueError: two tensors view one storage as different dtypes.
    """
    sharing = _Sharing(tensors.items(), len(tensors))
    storages = [storage for _, storage, _ in sharing.walk(tensors.items()) if storage is not None]
    return b"".join(_pickle_chunks(tensors.items(), sharing)), storages


_Items = Iterable[tuple[str, torch.Tensor]]


def _ptr(t: torch.Tensor) -> int:
    """The address of the tensor's storage, 0 for an empty one (empty storages are never shared)."""
    storage = t.untyped_storage()
    return storage.data_ptr() if storage.nbytes() else 0


class _Sharing:
    """Which tensors are met twice and which storages several tensors view, found before any write.

    Answering "seen before?" as the tensors go by would hold a set of every
    tensor's id and a dict of every storage's address: ~100 MiB of Python
    objects for a million tensors. Here the addresses are sorted in place in
    one int64 array (8 bytes a tensor, freed at once); only the repeated ones
    are kept, and only tensors on those storages (or on empty ones) are looked
    at again to find the tensor objects met twice.

    Raises:
        ValueError: two tensors view one storage as different dtypes.
    """

    def __init__(self, items: _Items, count: int) -> None:
        ptrs = np.fromiter((_ptr(t) for _, t in items), dtype=np.int64, count=count)
        ptrs.sort()
        repeats = ptrs[1:][ptrs[1:] == ptrs[:-1]]
        del ptrs
        self.shared: set[int] = set(repeats.tolist()) - {0}
        self.repeated: set[int] = set()
        if not len(repeats):
            return
        # a tensor met twice has its storage met twice (or is empty): only those tensors are looked at
        once: set[int] = set()
        dtypes: dict[int, torch.dtype] = {}
        for _, t in items:
            ptr = _ptr(t)
            if ptr and ptr not in self.shared:
                continue
            (self.repeated if id(t) in once else once).add(id(t))
            first = dtypes.setdefault(ptr, t.dtype) if ptr else t.dtype
            if first != t.dtype:  # torch.save refuses these too; say so before anything is written
                raise ValueError(
                    f"two tensors view one storage as {first} and as {t.dtype}; torch.save refuses "
                    "this too: save a .clone() of one of them"
                )

    def walk(self, items: _Items) -> Iterator[tuple[torch.Tensor, torch.UntypedStorage | None, str]]:
        """Each tensor, its storage where this tensor brings a new record (else None), and its record key.

        A tensor met again is pickled as a memo reference: it brings no record (its key is "").
        """
        keys: dict[int, str] = {}  # address of a shared storage -> its record's key
        met: set[int] = set()  # ids of the repeated tensors met so far
        count = 0
        shared, repeated = self.shared, self.repeated
        for _, t in items:
            if repeated and id(t) in repeated:
                if id(t) in met:
                    yield t, None, ""
                    continue
                met.add(id(t))
            storage = t.untyped_storage()
            if shared and storage.nbytes() and (ptr := storage.data_ptr()) in shared:
                key = keys.get(ptr)
                if key is not None:
                    yield t, None, key
                    continue
                keys[ptr] = key = str(count)
            else:
                key = str(count)
            count += 1
            yield t, storage, key


# the pickle is handed on in pieces of about this size (a million tensors pickle to ~100 MiB)
_PICKLE_CHUNK = 1 << 20


def _pickle_chunks(items: _Items, sharing: _Sharing) -> Iterator[bytes]:
    """The pickle of the dict, in consecutive pieces of about ``_PICKLE_CHUNK`` bytes."""
    p = _Pickle()
    seen: dict[int, bytes] = {}  # id(tensor) -> the memo get of the tensor pickled for it
    repeated = sharing.repeated
    parts = p.parts
    size = 0
    batch = 0
    for (name, _), (t, storage, key) in zip(items, sharing.walk(items), strict=True):
        parts.append(_unicode(name))
        known = seen.get(id(t)) if repeated else None
        if known is not None:
            parts.append(known)
        else:
            code = _tensor(p, t, t.untyped_storage() if storage is None else storage, key)
            parts.append(code)
            size += len(code)
            if id(t) in repeated:
                put, get = p.remember()
                parts.append(put)
                seen[id(t)] = get
        batch += 1
        if batch == 1000:  # pickle's own SETITEMS batch size
            parts.append(b"u(")
            batch = 0
        if size >= _PICKLE_CHUNK:
            yield b"".join(parts)
            parts.clear()
            size = 0
    parts.append(b"u.")
    yield b"".join(parts)


def _tensor(p: _Pickle, t: torch.Tensor, storage: torch.UntypedStorage, key: str) -> bytes:
    dtype = t.dtype
    codes = p.tensor_codes.get(dtype)
    if codes is None:
        first = _tensor_codes(p, dtype)
        # every global and string is in the memo now: the next tensor of this dtype gets memo gets
        codes = p.tensor_codes[dtype] = _tensor_codes(p, dtype)
    else:
        first = codes
    before_key, before_numel, after_flag, unit = first
    return b"".join(
        [
            before_key,
            _unicode(key),
            before_numel,
            _int(storage.nbytes() // unit),
            b"tQ",  # TUPLE, BINPERSID
            _int(int(t.storage_offset())),
            _tuple(tuple(t.shape)),
            _tuple(t.stride()),
            b"\x88" if t.requires_grad else b"\x89",
            after_flag,
        ]
    )


def _tensor_codes(p: _Pickle, dtype: torch.dtype) -> tuple[bytes, bytes, bytes, int]:
    """The constant parts of a tensor's pickle, and the bytes of one storage element.

    The parts are what comes before its storage key, before its numel, and
    after its requires_grad flag. The memo slots are taken in torch.save's
    order: rebuild function, storage type, dtype, "storage", "cpu", OrderedDict.
    """
    storage_class = _STORAGE_CLASS.get(dtype)
    if storage_class is not None:
        rebuild = p.global_("torch._utils", "_rebuild_tensor_v2")
        stype = p.global_("torch", storage_class)
        unit = dtype.itemsize
        dtype_arg = b""
    else:
        rebuild = p.global_("torch._utils", "_rebuild_tensor_v3")
        stype = p.global_("torch.storage", "UntypedStorage")
        unit = 1
        dtype_arg = p.global_("torch", str(dtype).removeprefix("torch."))
    before_key = rebuild + b"((" + p.string("storage") + stype
    before_numel = p.string("cpu")
    after_flag = p.global_("collections", "OrderedDict") + b")R" + dtype_arg + b"tR"  # empty backward hooks
    return before_key, before_numel, after_flag, unit


# -- the archive -----------------------------------------------------------------------------------


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor without lazy bits (conjugate, negative) that torch.save would store as metadata."""
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t


class _PlainItems:
    """The (name, tensor) pairs to save, each as :func:`_plain` made it; iterable as often as needed.

    Only the tensors ``_plain`` replaced (copies from a GPU, resolved lazy
    bits) are held here; a CPU state dict is walked as it is, not copied.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.replaced: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            plain = _plain(t)
            if plain is not t:
                self.replaced[name] = plain

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        if not self.replaced:
            return iter(self.tensors.items())
        replaced = self.replaced
        return ((name, replaced.get(name, t)) for name, t in self.tensors.items())


def _storage_view(storage: torch.UntypedStorage) -> memoryview:
    if not storage.nbytes():
        return memoryview(b"")
    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy().data


class _Layout:
    """Offsets of the records, in file order, and what their central directory entries need.

    Each record leaves 20 bytes here (CRC, size, offset in three arrays), not
    a directory entry as a bytes object (~100 bytes each, ~10 MiB for 100k records).
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.offset = 0
        self.crcs = array("I")
        self.sizes = array("Q")
        self.offsets = array("Q")

    def header(self, name: str, size: int, crc: int) -> bytes:
        """The local header (with its alignment padding) of a record placed at the current offset."""
        raw = f"{self.root}/{name}".encode()
        zip64 = size >= _U32_MAX
        extra = _ZIP64_EXTRA.pack(1, 16, size, size) if zip64 else b""
        unpadded = self.offset + _LOCAL.size + len(raw) + len(extra) + 4
        pad = -unpadded % _ALIGN
        extra += b"FB" + struct.pack("<H", pad) + bytes(pad)
        small = _U32_MAX if zip64 else size
        header = _LOCAL.pack(
            b"PK\x03\x04", 45 if zip64 else 20, _FLAG_UTF8, 0, 0, 0, crc, small, small, len(raw), len(extra)
        )
        return header + raw + extra

    def local(self, name: str, size: int, crc: int) -> bytes:
        """:meth:`header` of the record placed at the current offset, which moves past it."""
        header = self.header(name, size, crc)
        self.crcs.append(crc)
        self.sizes.append(size)
        self.offsets.append(self.offset)
        self.offset += len(header) + size
        return header

    def _central(self, raw: bytes, size: int, crc: int, offset: int) -> bytes:
        big_size = size >= _U32_MAX
        big_offset = offset >= _U32_MAX
        extra = b""
        if big_size and big_offset:
            extra = _ZIP64_EXTRA_OFFSET.pack(1, 24, size, size, offset)
        elif big_size:
            extra = _ZIP64_EXTRA.pack(1, 16, size, size)
        elif big_offset:
            extra = struct.pack("<HHQ", 1, 8, offset)
        small = _U32_MAX if big_size else size
        return (
            _CENTRAL.pack(
                b"PK\x01\x02",
                45 if extra else 20,
                45 if extra else 20,
                _FLAG_UTF8,
                0,
                0,
                0,
                crc,
                small,
                small,
                len(raw),
                len(extra),
                0,
                0,
                0,
                0,
                _U32_MAX if big_offset else offset,
            )
            + raw
            + extra
        )

    def end(self, names: Iterable[str]) -> Iterator[bytes]:
        """The central directory of the records so far (``names`` in their order), then the end records.

        The directory comes in pieces of about ``_PICKLE_CHUNK`` bytes, as it is packed.
        """
        cd_offset = self.offset
        length = 0
        parts: list[bytes] = []
        size = 0
        root = self.root
        for name, crc, nbytes, offset in zip(names, self.crcs, self.sizes, self.offsets, strict=True):
            entry = self._central(f"{root}/{name}".encode(), nbytes, crc, offset)
            parts.append(entry)
            size += len(entry)
            if size >= _PICKLE_CHUNK:
                yield b"".join(parts)
                parts.clear()
                length += size
                size = 0
        length += size
        count = len(self.crcs)
        eocd64_at = cd_offset + length
        eocd64 = _EOCD64.pack(b"PK\x06\x06", _EOCD64.size - 12, 45, 45, 0, 0, count, count, length, cd_offset)
        locator = _LOCATOR.pack(b"PK\x06\x07", 0, eocd64_at, 1)
        eocd = _EOCD.pack(
            b"PK\x05\x06",
            0,
            0,
            min(count, 0xFFFF),
            min(count, 0xFFFF),
            min(length, _U32_MAX),
            min(cd_offset, _U32_MAX),
            0,
        )
        parts += [eocd64, locator, eocd]
        self.offset = eocd64_at + len(eocd64) + len(locator) + len(eocd)
        yield b"".join(parts)


def _crcs(views: list[memoryview]) -> list[int]:
    return [crc32(v) for v in views]


def write_torch_zip(
    fd: int,
    tensors: Mapping[str, torch.Tensor],
    *,
    root: str,
    records: Mapping[str, bytes] | None = None,
) -> int:
    """Write ``tensors`` as the zip ``torch.save(dict(tensors), f)`` writes, to the open descriptor ``fd``.

    The pickle is written as it is made and its header rewritten in place once
    its size and CRC are known, so ``fd`` must be a regular file (``os.pwrite``).
    No per-tensor object outlives its write batch: a save of a million 1 KiB
    tensors peaks at ~45 MiB besides the state dict and the 64-byte storage
    object torch makes (and keeps) for each tensor asked for its storage.

    Args:
        fd (int): a regular file's descriptor, open for writing, at offset 0.
        tensors (Mapping[str, Tensor]): the state dict (strided tensors; others are copied to CPU first).
        root (str): the archive's root folder (:func:`archive_root` of the final path).
        records (Mapping[str, bytes] | None, default None): extra records under the root
            (``torch.load`` ignores them), written after the tensor data.

    Returns:
        The bytes written.

    Raises:
        ValueError: two tensors view one storage as different dtypes (before anything is written),
            or the pickle reaches 4 GiB (some 40 million tensors).
    """
    items = _PlainItems(tensors)
    sharing = _Sharing(items, len(tensors))
    layout = _Layout(root)
    _write_pickle(fd, layout, _pickle_chunks(items, sharing))
    head = [(".format_version", b"1"), (".storage_alignment", str(_ALIGN).encode()), ("byteorder", b"little")]
    out: list[memoryview] = []
    for name, raw in head:
        out += [memoryview(layout.local(name, len(raw), crc32(raw))), memoryview(raw)]
    count = 0
    storages = (storage for _, storage, _ in sharing.walk(items) if storage is not None)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchkeep-crc") as pool:
        # the CRCs run ahead of the writes (see _AHEAD); only the queued groups' views are alive
        ahead: deque[tuple[list[memoryview], Future[list[int]]]] = deque()
        queued = 0
        for views in _groups(storages):
            ahead.append((views, pool.submit(_crcs, views)))
            queued += len(views)
            while len(ahead) > _AHEAD or (len(ahead) > 1 and queued - len(ahead[0][0]) > _AHEAD_RECORDS):
                done, crcs = ahead.popleft()
                queued -= len(done)
                count = _write_group(fd, layout, out, done, crcs, count)
                out = []
        while ahead:
            count = _write_group(fd, layout, out, *ahead.popleft(), count)
            out = []
    tail = [*(records or {}).items(), ("version", b"3\n"), (".data/serialization_id", _serialization_id())]
    for name, raw in tail:
        out += [memoryview(layout.local(name, len(raw), crc32(raw))), memoryview(raw)]
    names = chain(["data.pkl"], (name for name, _ in head), (f"data/{i}" for i in range(count)))
    for piece in layout.end(chain(names, (name for name, _ in tail))):  # the directory, as it is packed
        out.append(memoryview(piece))
        for batch in _batches(out):
            _write_all(fd, batch)
        out = []
    return layout.offset


def _write_pickle(fd: int, layout: _Layout, chunks: Iterable[bytes]) -> None:
    """Write the ``data.pkl`` record at offset 0 as its pickle is made: header last, in place."""
    placeholder = layout.header("data.pkl", 0, 0)
    _write_all(fd, [memoryview(placeholder)])
    size = crc = 0
    for chunk in chunks:
        _write_all(fd, [memoryview(chunk)])
        crc = crc32(chunk, crc)
        size += len(chunk)
    if size >= _U32_MAX:  # a zip64 header would not fit the placeholder's place
        raise ValueError(
            f"the pickle of this state dict is {size} bytes; a .pt file's pickle stays under 4 GiB"
        )
    header = layout.local("data.pkl", size, crc)
    if os.pwrite(fd, header, 0) != len(header):
        raise OSError("short write of the pickle's zip header")


def _write_group(
    fd: int,
    layout: _Layout,
    out: list[memoryview],
    views: list[memoryview],
    crcs: Future[list[int]],
    first: int,
) -> int:
    """Write the records of ``views`` (after ``out``), numbered from ``first``; the next record's number."""
    for index, (view, crc) in enumerate(zip(views, crcs.result(), strict=True), first):
        out.append(memoryview(layout.local(f"data/{index}", len(view), crc)))
        if len(view):
            out.append(view)
    for batch in _batches(out):
        _write_all(fd, batch)
    return first + len(views)


# A group of records ends at this many bytes or this many records, whichever comes first: big enough
# that the CRC thread's hand-offs cost nothing, small enough that few views are alive at once.
_GROUP_BYTES = 16 << 20
_GROUP_RECORDS = 1024
# The CRC thread runs up to _AHEAD groups ahead of the writes while those hold few records (large
# tensors: it keeps ahead on a busy machine), else one group: a CRC per small view takes the GIL back
# each time, and racing the main thread making the next group's views slowed those 2.5x (2000 x 32 KiB).
_AHEAD = 4
_AHEAD_RECORDS = 64


def _groups(storages: Iterable[torch.UntypedStorage]) -> Iterator[list[memoryview]]:
    """Views of the storages in consecutive groups of about ``_GROUP_BYTES`` (at least one view each)."""
    group: list[memoryview] = []
    size = 0
    for storage in storages:
        view = _storage_view(storage)
        group.append(view)
        size += len(view)
        if size >= _GROUP_BYTES or len(group) >= _GROUP_RECORDS:
            yield group
            group, size = [], 0
    if group:
        yield group


def _serialization_id() -> bytes:
    # torch writes a random 40-digit decimal id; only its presence matters to readers
    return str(secrets.randbits(128)).zfill(40).encode()

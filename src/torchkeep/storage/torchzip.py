"""Writing ``torch.save`` zip files in one pass, straight from each tensor's memory.

``torch.save`` pickles every tensor through Python (``__reduce_ex__``, a
persistent id per storage: ~50 us a tensor) and hands each storage to its zip
writer one record at a time. This writer emits the same archive itself: the
pickle of a ``dict[str, Tensor]`` is put together from a few byte strings per
tensor, and the records go to ``os.writev`` in large batches from the
storages' own memory, while a second thread computes their CRC-32s (ISA-L
releases the GIL) one batch ahead of the writes.

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
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

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
# CRCs run one group ahead of the writes: groups this large keep the wait before the first write short
_CRC_GROUP = 16 << 20

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
    p = _Pickle()
    storages: list[torch.UntypedStorage] = []
    keys: dict[int, tuple[str, torch.dtype]] = {}  # data_ptr of a non-empty storage -> (key, dtype)
    seen: dict[int, bytes] = {}  # id(tensor) -> the memo get of the tensor pickled for it
    repeated = _repeated(tensors)
    parts = p.parts
    batch = 0
    for name, t in tensors.items():
        parts.append(_unicode(name))
        known = seen.get(id(t))
        if known is not None:
            parts.append(known)
        else:
            parts.append(_tensor(p, t, storages, keys))
            if id(t) in repeated:
                put, get = p.remember()
                parts.append(put)
                seen[id(t)] = get
        batch += 1
        if batch == 1000:  # pickle's own SETITEMS batch size
            parts.append(b"u(")
            batch = 0
    parts.append(b"u.")
    return b"".join(parts), storages


def _repeated(tensors: Mapping[str, torch.Tensor]) -> set[int]:
    once: set[int] = set()
    twice: set[int] = set()
    for t in tensors.values():
        (twice if id(t) in once else once).add(id(t))
    return twice


def _tensor(
    p: _Pickle,
    t: torch.Tensor,
    storages: list[torch.UntypedStorage],
    keys: dict[int, tuple[str, torch.dtype]],
) -> bytes:
    storage = t.untyped_storage()
    dtype = t.dtype
    ptr = storage.data_ptr() if storage.nbytes() else 0
    found = keys.get(ptr) if ptr else None
    if found is None:
        key = str(len(storages))
        storages.append(storage)
        if ptr:
            keys[ptr] = (key, dtype)
    else:
        key, first = found
        if first != dtype:
            raise ValueError(
                f"two tensors view one storage as {first} and as {dtype}; torch.save refuses this too: "
                "save a .clone() of one of them"
            )
    storage_class = _STORAGE_CLASS.get(dtype)
    itemsize = dtype.itemsize
    if storage_class is not None:
        rebuild = p.global_("torch._utils", "_rebuild_tensor_v2")
        stype = p.global_("torch", storage_class)
        numel = storage.nbytes() // itemsize
        dtype_arg = b""
    else:
        rebuild = p.global_("torch._utils", "_rebuild_tensor_v3")
        stype = p.global_("torch.storage", "UntypedStorage")
        numel = storage.nbytes()
        dtype_arg = p.global_("torch", str(dtype).removeprefix("torch."))
    return b"".join(
        [
            rebuild,
            b"((",
            p.string("storage"),
            stype,
            _unicode(key),
            p.string("cpu"),
            _int(numel),
            b"tQ",  # TUPLE, BINPERSID
            _int(int(t.storage_offset())),
            _tuple(tuple(t.shape)),
            _tuple(t.stride()),
            b"\x88" if t.requires_grad else b"\x89",
            p.global_("collections", "OrderedDict"),
            b")R",  # the empty backward hooks
            dtype_arg,
            b"tR",
        ]
    )


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


def _storage_view(storage: torch.UntypedStorage) -> memoryview:
    if not storage.nbytes():
        return memoryview(b"")
    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy().data


class _Layout:
    """Offsets of the records, in file order, and the central directory entries as they are placed."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.offset = 0
        self.central: list[bytes] = []

    def local(self, name: str, size: int, crc: int) -> bytes:
        """The local header (with its alignment padding) of the record placed at the current offset."""
        raw = f"{self.root}/{name}".encode()
        start = self.offset
        zip64 = size >= _U32_MAX
        extra = _ZIP64_EXTRA.pack(1, 16, size, size) if zip64 else b""
        unpadded = start + _LOCAL.size + len(raw) + len(extra) + 4
        pad = -unpadded % _ALIGN
        extra += b"FB" + struct.pack("<H", pad) + bytes(pad)
        small = _U32_MAX if zip64 else size
        header = _LOCAL.pack(
            b"PK\x03\x04", 45 if zip64 else 20, _FLAG_UTF8, 0, 0, 0, crc, small, small, len(raw), len(extra)
        )
        self.offset = start + len(header) + len(raw) + len(extra) + size
        self.central.append(self._central(raw, size, crc, start))
        return header + raw + extra

    @staticmethod
    def _central(raw: bytes, size: int, crc: int, offset: int) -> bytes:
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

    def end(self) -> bytes:
        """The central directory and the (zip64) end records, placed at the current offset."""
        directory = b"".join(self.central)
        count = len(self.central)
        cd_offset = self.offset
        eocd64_at = cd_offset + len(directory)
        eocd64 = _EOCD64.pack(
            b"PK\x06\x06", _EOCD64.size - 12, 45, 45, 0, 0, count, count, len(directory), cd_offset
        )
        locator = _LOCATOR.pack(b"PK\x06\x07", 0, eocd64_at, 1)
        eocd = _EOCD.pack(
            b"PK\x05\x06",
            0,
            0,
            min(count, 0xFFFF),
            min(count, 0xFFFF),
            min(len(directory), _U32_MAX),
            min(cd_offset, _U32_MAX),
            0,
        )
        return directory + eocd64 + locator + eocd


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

    Args:
        fd (int): a file descriptor open for writing, at offset 0.
        tensors (Mapping[str, Tensor]): the state dict (strided tensors; others are copied to CPU first).
        root (str): the archive's root folder (:func:`archive_root` of the final path).
        records (Mapping[str, bytes] | None, default None): extra records under the root
            (``torch.load`` ignores them), written after the tensor data.

    Returns:
        The bytes written.

    Raises:
        ValueError: two tensors view one storage as different dtypes.
    """
    plain = {name: _plain(t) for name, t in tensors.items()}
    pickled, storages = pickle_state_dict(plain)
    layout = _Layout(root)
    head = [
        ("data.pkl", pickled),
        (".format_version", b"1"),
        (".storage_alignment", str(_ALIGN).encode()),
        ("byteorder", b"little"),
    ]
    tail = [*(records or {}).items(), ("version", b"3\n"), (".data/serialization_id", _serialization_id())]
    first: list[memoryview] = []
    for name, raw in head:
        first += [memoryview(layout.local(name, len(raw), crc32(raw))), memoryview(raw)]
    views = [_storage_view(s) for s in storages]
    groups = _groups(views)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchkeep-crc") as pool:
        pending: list[Future[list[int]]] = [pool.submit(_crcs, views[lo:hi]) for lo, hi in groups]
        out = first
        for (lo, hi), future in zip(groups, pending, strict=True):
            for index, (view, crc) in enumerate(zip(views[lo:hi], future.result(), strict=True), lo):
                out.append(memoryview(layout.local(f"data/{index}", len(view), crc)))
                if len(view):
                    out.append(view)
            for batch in _batches(out):
                _write_all(fd, batch)
            out = []
    for name, raw in tail:
        out += [memoryview(layout.local(name, len(raw), crc32(raw))), memoryview(raw)]
    out.append(memoryview(layout.end()))
    for batch in _batches(out):
        _write_all(fd, batch)
    return layout.offset + len(out[-1])


def _groups(views: list[memoryview]) -> list[tuple[int, int]]:
    """``views`` cut into consecutive index ranges of about ``_CRC_GROUP`` bytes (at least one view each)."""
    groups: list[tuple[int, int]] = []
    lo = 0
    size = 0
    for i, view in enumerate(views):
        size += len(view)
        if size >= _CRC_GROUP:
            groups.append((lo, i + 1))
            lo, size = i + 1, 0
    if lo < len(views) or not groups:
        groups.append((lo, len(views)))
    return groups


def _serialization_id() -> bytes:
    # torch writes a random 40-digit decimal id; only its presence matters to readers
    return str(secrets.randbits(128)).zfill(40).encode()

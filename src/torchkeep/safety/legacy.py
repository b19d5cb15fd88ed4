"""Reading ``torch.save``'s legacy (pre-1.6) format without unpickling it.

Such a file is five pickles one after another (magic number, protocol, system info, the data,
the list of storage keys), then each storage's length and raw bytes. A first pass runs the data
pickle with placeholder storages to learn where each one's bytes are; a second builds it.
"""

from __future__ import annotations

import io
import mmap as mmap_module
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch

from torchkeep.errors import CorruptFileError, UnknownFormatError, UnsupportedFormatError
from torchkeep.safety.allowlist import StorageRef, StorageType, TensorLimits
from torchkeep.safety.limits import Limits
from torchkeep.safety.records import read_into
from torchkeep.safety.storages import Storages, meta_storage
from torchkeep.safety.structure import check_structure
from torchkeep.safety.unpickler import Collector, Unpickler

__all__ = ["LEGACY_MAGIC", "LEGACY_PREFIX", "load_legacy"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# torch.save's legacy format starts with this pickled integer (protocol 2)
LEGACY_PREFIX = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def load_legacy(
    path: Path,
    f: BinaryIO,
    size: int,
    *,
    device: torch.device | None,
    limits: Limits,
    meta: bool,
    collect: Collector | None = None,
    opaque: bool = False,
) -> Any:
    """What the legacy-format file ``f`` holds (``None`` with ``meta``: then it is only checked)."""
    if size == 0:
        raise CorruptFileError(path, "the file is empty (0 bytes)")
    if isinstance(f, io.BytesIO):
        return _read_legacy(
            path,
            f.getbuffer(),
            f,
            size,
            device=device,
            limits=limits,
            meta=meta,
            collect=collect,
            opaque=opaque,
        )
    with mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_READ) as mm:
        return _read_legacy(
            path, mm, f, size, device=device, limits=limits, meta=meta, collect=collect, opaque=opaque
        )


def _read_legacy(
    path: Path,
    mm: Any,
    f: BinaryIO,
    size: int,
    *,
    device: torch.device | None,
    limits: Limits,
    meta: bool,
    collect: Collector | None,
    opaque: bool = False,
) -> Any:
    def run(unpickler: Unpickler) -> Any:
        try:
            return unpickler.run(allow_trailing=True)
        finally:
            if collect is not None:
                collect(unpickler)

    def small(start: int) -> tuple[Any, int]:
        unpickler = Unpickler(
            mm, path=path, member=None, start=start, storages=None, limits=limits, collect=collect is not None
        )
        return run(unpickler), unpickler.end

    if not (len(mm) > 2 and mm[0] == 0x80):
        raise UnknownFormatError(path, "binary data of no known format")
    magic, pos = small(0)
    if magic != LEGACY_MAGIC:
        raise UnknownFormatError(path, "a plain pickle file, not written by torch.save")
    protocol, pos = small(pos)
    if protocol != _LEGACY_PROTOCOL:
        raise CorruptFileError(path, f"unknown legacy protocol version {protocol!r}")
    sys_info, pos = small(pos)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise UnsupportedFormatError(
            path,
            "a legacy torch.save file from a big-endian machine",
            "Pass trust=True to load it with torch.load, or re-save it where it was made.",
        )
    tensor_limits = TensorLimits(limits.max_numel, limits.max_tensors, max_bytes=limits.max_bytes)
    # Pass 1: find where each storage's bytes are (they follow all the pickles).
    declared: dict[str, tuple[StorageType, int]] = {}

    def note(key: str, stype: StorageType, numel: int, location: str, view: Any) -> StorageRef:
        previous = declared.setdefault(key, (stype, numel))
        if previous != (stype, numel):
            raise CorruptFileError(path, f"storage {key!r} is declared twice with different types or sizes")
        return StorageRef(key, meta_storage(numel * stype.dtype.itemsize), stype.dtype, numel)

    first = Unpickler(
        mm,
        path=path,
        member=None,
        start=pos,
        storages=note,
        limits=limits,
        tensor_limits=TensorLimits(limits.max_numel, limits.max_tensors, max_bytes=limits.max_bytes),
        collect=collect is not None,
        opaque=opaque,
    )
    first_result = run(first)
    keys, data_start = small(first.end)
    if not isinstance(keys, list) or any(type(k) is not str for k in keys) or set(keys) != set(declared):
        raise CorruptFileError(path, "the list of storages does not match the storages the data refers to")
    offsets: dict[str, int] = {}
    at = data_start
    for key in keys:
        stype, numel = declared[key]
        raw = bytes(mm[at : at + 8])
        if len(raw) != 8 or struct.unpack("<q", raw)[0] != numel:
            raise CorruptFileError(path, f"storage {key!r} does not start with its size {numel}", offset=at)
        offsets[key] = at + 8
        at += 8 + numel * stype.dtype.itemsize
        if at > size:
            raise CorruptFileError(path, "the file is truncated inside the tensor data", offset=at)
    if at != size:
        raise CorruptFileError(path, f"{size - at} unexplained bytes follow the tensor data", offset=at)
    # Pass 2: build, with storages read from where pass 1 found them.
    storages = Storages(path, device=device, limits=limits, meta=meta)
    views: dict[str, StorageRef] = {}

    def build(key: str, nbytes: int) -> torch.UntypedStorage | None:
        if meta:
            return None
        try:
            storage, _crc = read_into(f, offsets[key], nbytes)
        except (OSError, EOFError) as err:
            raise CorruptFileError(path, f"reading storage {key!r} failed ({err})") from err
        return storage

    def load(key: str, stype: StorageType, numel: int, location: str, view: Any) -> StorageRef:
        root = storages.get(key, stype, numel, location, build)
        if view is None:
            return root
        view_key, offset, view_numel = view
        if offset + view_numel > numel:
            raise CorruptFileError(path, f"storage view {view_key!r} lies outside storage {key!r}")
        if view_key not in views:
            itemsize = stype.dtype.itemsize
            sliced = root.storage[offset * itemsize : (offset + view_numel) * itemsize]
            views[view_key] = StorageRef(view_key, sliced, stype.dtype, view_numel)
        return views[view_key]

    if meta:
        if not first.findings:
            check_structure(first_result, path=path, limits=limits, opaque=opaque)
        return None  # pass 1 checked every reference and the data layout; nothing more to see
    second = Unpickler(
        mm,
        path=path,
        member=None,
        start=pos,
        storages=load,
        limits=limits,
        tensor_limits=tensor_limits,
        opaque=opaque,
    )
    result = second.run(allow_trailing=True)
    check_structure(result, path=path, limits=limits, opaque=opaque)
    return result

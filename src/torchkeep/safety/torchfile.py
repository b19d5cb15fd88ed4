"""Reading ``torch.save`` files (zip and legacy) without unpickling them.

The archive is checked by :class:`~torchkeep.safety.ziparchive.ZipArchive`,
``data.pkl`` runs on the allowlist :class:`~torchkeep.safety.unpickler.Unpickler`,
and each storage comes straight from its zip record: read into memory that
belongs to the tensor (CRC-checked on the way), or memory-mapped
(``mmap=True``: nothing is read until used, so the CRC is not checked).
Every storage must be exactly as long as its reference says
(``numel * itemsize == record length``), and every tensor view must lie
inside its storage.
"""

from __future__ import annotations

import io
import json
import logging
import mmap as mmap_module
import os
import re
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch

from torchkeep.errors import CorruptFileError, LimitExceededError, UnknownFormatError, UnsupportedFormatError
from torchkeep.safety.allowlist import StorageRef, StorageType, TensorLimits
from torchkeep.safety.crc import crc32
from torchkeep.safety.findings import Finding
from torchkeep.safety.limits import DEFAULT_LIMITS, Limits
from torchkeep.safety.structure import check_structure
from torchkeep.safety.unpickler import Unpickler
from torchkeep.safety.ziparchive import ZipArchive, ZipMember

__all__ = [
    "LEGACY_MAGIC",
    "LEGACY_PREFIX",
    "METADATA_RECORD",
    "load_torch_file",
    "read_metadata_record",
    "scan_torch_stream",
    "torch_prefix",
]

logger = logging.getLogger(__name__)

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_LOCATION = re.compile(r"[a-z_]{1,32}(:[0-9]{1,4})?")
_READ_CHUNK = 64 << 20
_PARALLEL_FROM = 32 << 20  # below this one thread reads: starting more costs more than it saves
_MAX_READERS = 4
# torchkeep's text metadata in a torch.save zip (torch.load ignores the record)
METADATA_RECORD = "extra/torchkeep_metadata.json"
# torch.save's legacy format starts with this pickled integer (protocol 2)
LEGACY_PREFIX = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


class _Storages:
    """Builds storages for persistent ids, once per key, and keeps the byte budget."""

    def __init__(
        self,
        path: Path,
        *,
        device: torch.device | None,
        limits: Limits,
        meta: bool,
    ) -> None:
        self.path = path
        self.device = device
        self.limits = limits
        self.meta = meta
        self.total = 0
        self.loaded: dict[str, StorageRef] = {}

    def _target(self, location: str) -> torch.device:
        if not _LOCATION.fullmatch(location):
            raise CorruptFileError(self.path, f"a storage has the invalid location {location!r}")
        if self.device is not None:
            return self.device
        try:
            saved = torch.device(location)
        except RuntimeError as err:
            raise CorruptFileError(self.path, f"a storage has the invalid location {location!r}") from err
        if saved.type != "cpu" and not _device_available(saved):
            raise UnsupportedFormatError(
                self.path,
                f"a file with tensors saved on {location}",
                "That device is not available here; pass map_location='cpu' (or another device).",
            )
        return saved

    def get(self, key: str, stype: StorageType, numel: int, location: str, build: Any) -> StorageRef:
        if not _KEY.fullmatch(key):
            raise CorruptFileError(self.path, f"a storage has the invalid key {key[:40]!r}")
        known = self.loaded.get(key)
        if known is not None:
            if (known.dtype, known.numel) != (stype.dtype, numel):
                raise CorruptFileError(
                    self.path,
                    f"storage {key!r} is referenced as {numel} x {stype.dtype} and as "
                    f"{known.numel} x {known.dtype}",
                )
            return known
        nbytes = numel * stype.dtype.itemsize
        self.total += nbytes
        if self.total > self.limits.max_bytes:
            raise LimitExceededError(
                self.path, "max_bytes", self.total, self.limits.max_bytes, what="tensor data"
            )
        device = self._target(location)
        if self.meta:
            storage = _meta_storage(nbytes)
            build(nbytes)  # still checks that the record exists and has the declared size
        else:
            storage = build(nbytes)
            if device.type != "cpu":
                storage = _move(storage, device)
        ref = StorageRef(key, storage, stype.dtype, numel)
        self.loaded[key] = ref
        return ref


def _device_available(device: torch.device) -> bool:
    module = getattr(torch, device.type, None)
    available = getattr(module, "is_available", None)
    try:
        return bool(available()) if callable(available) else False
    except RuntimeError:
        return False


def _move(storage: torch.UntypedStorage, device: torch.device) -> torch.UntypedStorage:
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)
    moved: torch.UntypedStorage = flat.to(device).untyped_storage()
    return moved


def _meta_storage(nbytes: int) -> torch.UntypedStorage:
    return torch.empty(nbytes, dtype=torch.uint8, device="meta").untyped_storage()


def _read_into(f: Any, offset: int, nbytes: int) -> tuple[torch.UntypedStorage, int]:
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


class _Arena:
    """Every stored data record of an archive, read into one buffer in the background.

    One allocation and large reads instead of one of each per tensor. The
    records are split into a few runs of about equal size, each read by its
    own thread (page faults of the new buffer then happen on every core; two
    threads halved a 1 GiB read here) which also checks each record's CRC-32
    right after reading it, while it is in the cache. Reads and CRCs release
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
        self._threads = [
            threading.Thread(target=self._guard, args=(run,), name="torchkeep-read", daemon=True)
            for run in _runs(ordered, _reader_count(length))
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
            for member in run:
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
        finally:
            os.close(fd)

    def finish(self, *, abort: bool = False) -> None:
        """Wait for the reads and checks; raise the first error they hit (unless aborting)."""
        if self._finished:
            return
        self._finished = True
        if abort:
            self._stop = True
        for thread in self._threads:
            thread.join()
        self._view.release()
        if self._errors and not abort:
            raise self._errors[0]


def _reader_count(length: int) -> int:
    if length < _PARALLEL_FROM:
        return 1
    return max(1, min(_MAX_READERS, os.cpu_count() or 1))


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


def _device_of(map_location: str | torch.device | None) -> torch.device | None:
    return None if map_location is None else torch.device(map_location)


def load_torch_file(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device | None = "cpu",
    mmap: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    opaque: bool = False,
) -> Any:
    """What ``torch.load(path, weights_only=True)`` returns, built without unpickling.

    Args:
        path (str | PathLike): a ``torch.save`` file, zip or legacy format.
        map_location (str | torch.device | None, default "cpu"): where tensors
            go; None keeps the device each was saved on.
        mmap (bool, default False): map the file instead of reading it
            (zip format only): returns at once, pages are read on first use,
            and CRCs are not checked.
        limits (Limits): bounds checked before anything is allocated.
        opaque (bool, default False): objects outside the allowlist become
            inert :class:`~torchkeep.safety.opaque.Opaque` placeholders
            instead of a refusal; the caller must decide where they may be
            (``load_checkpoint`` allows them only in hyper-parameter entries).

    Raises:
        UnsafeFileError: the file imports or calls something outside the
            allowlist, or is built to fool readers; nothing was unpickled.
        CorruptFileError: the file is damaged.
        LimitExceededError: the file asks for more than ``limits`` allow.
        UnsupportedFormatError: a known format that cannot be read safely.
    """
    p = Path(path)
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(4)
        if head == b"PK\x03\x04":
            return _load_zip(
                p,
                f,
                size,
                device=_device_of(map_location),
                mmap=mmap,
                limits=limits,
                meta=False,
                opaque=opaque,
            )
        return _load_legacy(
            p, f, size, device=_device_of(map_location), limits=limits, meta=False, opaque=opaque
        )


def torch_prefix(archive: ZipArchive) -> str:
    """The folder every record of a ``torch.save`` archive lives in.

    Raises:
        CorruptFileError: not exactly one ``<folder>/data.pkl`` or records outside it.
    """
    pickles = [name for name in archive.members if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise CorruptFileError(
            archive.path, f"a torch.save archive holds one <folder>/data.pkl, this one holds {len(pickles)}"
        )
    prefix = pickles[0][: -len("data.pkl")]
    strays = [name for name in archive.members if not name.startswith(prefix)]
    if strays:
        raise CorruptFileError(archive.path, f"records outside the archive folder {prefix!r}: {strays[:3]}")
    return prefix


def read_metadata_record(archive: ZipArchive, prefix: str, limits: Limits) -> dict[str, str]:
    """torchkeep's metadata record of a ``torch.save`` archive (empty if there is none).

    Loaders and ``scan`` both check it, so a record that is not what
    ``save_weights`` writes is the same finding everywhere.

    Raises:
        CorruptFileError: the record is not a JSON object of str to str.
        LimitExceededError: it is larger than ``limits.max_header_bytes``.
    """
    name = prefix + METADATA_RECORD
    if name not in archive.members:
        return {}
    raw = archive.read(name, max_size=limits.max_header_bytes)
    try:
        loaded = json.loads(raw)
    except (ValueError, RecursionError) as err:  # bad JSON, an int past Python's digit limit, deep nesting
        raise CorruptFileError(
            archive.path, f"the metadata record is not valid JSON ({type(err).__name__})", member=name
        ) from None
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in loaded.items()
    ):
        raise CorruptFileError(
            archive.path,
            f"the metadata record is a JSON {type(loaded).__name__} that is not an object of strings "
            "(save_weights writes {str: str})",
            member=name,
        )
    return loaded


Collector = Callable[[Unpickler], None]


def _load_zip(
    path: Path,
    f: BinaryIO,
    size: int,
    *,
    device: torch.device | None,
    mmap: bool,
    limits: Limits,
    meta: bool,
    collect: Collector | None = None,
    opaque: bool = False,
) -> Any:
    archive = ZipArchive(path, f, size, limits=limits)
    prefix = torch_prefix(archive)
    byteorder = archive.members.get(prefix + "byteorder")
    if byteorder is not None and archive.read(byteorder.name, max_size=16) != b"little":
        raise UnsupportedFormatError(
            path,
            "a torch.save file written on a big-endian machine",
            "Load it there with torch.load and save it again, or pass trust=True to use torch.load here.",
        )
    read_metadata_record(archive, prefix, limits)
    pickle_member = archive.member(prefix + "data.pkl")
    data = archive.read(pickle_member.name, max_size=limits.max_pickle_bytes)
    records = [m for name, m in archive.members.items() if name.startswith(prefix + "data/")]
    total = sum(m.size for m in records)
    if total > limits.max_bytes:
        raise LimitExceededError(path, "max_bytes", total, limits.max_bytes, what="tensor data")
    stored = [m for m in records if m.stored]
    arena = _Arena(path, archive, stored) if stored and not mmap and not meta else None
    mapped: list[torch.UntypedStorage] = []

    def build_record(member: ZipMember) -> Any:
        def build(nbytes: int) -> torch.UntypedStorage | None:
            if member.size != nbytes:
                raise CorruptFileError(
                    path,
                    f"the storage needs {nbytes} bytes but its record holds {member.size} "
                    "(a declared size that does not match the data is how CVE-2026-24747 files attack)",
                    member=member.name,
                )
            if meta:
                return None
            if not member.stored:
                raw = archive.read(member.name)
                return (
                    torch.frombuffer(bytearray(raw), dtype=torch.uint8).untyped_storage()
                    if raw
                    else (torch.empty(0, dtype=torch.uint8).untyped_storage())
                )
            if arena is not None:
                return arena.slice(member)
            if not mapped:
                whole = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
                mapped.append(cast(torch.UntypedStorage, whole))
            return cast(torch.UntypedStorage, mapped[0][member.data_offset : member.data_offset + nbytes])

        return build

    storages = _Storages(path, device=device, limits=limits, meta=meta)

    def load(key: str, stype: StorageType, numel: int, location: str, view: Any) -> StorageRef:
        if view is not None:
            raise CorruptFileError(
                path, "a storage view in a zip-format file (only the legacy format has them)"
            )
        if not _KEY.fullmatch(key):
            raise CorruptFileError(path, f"a storage has the invalid key {key[:40]!r}")
        member = archive.member(f"{prefix}data/{key}")
        return storages.get(key, stype, numel, location, build_record(member))

    unpickler = Unpickler(
        data,
        path=path,
        member=prefix + "data.pkl",
        storages=load,
        limits=limits,
        collect=collect is not None,
        stored_size=pickle_member.compressed_size,
        opaque=opaque,
    )
    try:
        if arena is not None and device is not None and device.type != "cpu":
            arena.finish()  # storages are copied to the device as they are met: they must be complete
        result = unpickler.run()
        if not unpickler.findings:  # with findings (collect mode) the result holds placeholders
            check_structure(result, path=path, limits=limits, opaque=opaque)
    except BaseException:
        if arena is not None:
            arena.finish(abort=True)
        raise
    finally:
        if collect is not None:
            collect(unpickler)
    if arena is not None:
        arena.finish()
    return result


def _load_legacy(
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
        return StorageRef(key, _meta_storage(numel * stype.dtype.itemsize), stype.dtype, numel)

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
    storages = _Storages(path, device=device, limits=limits, meta=meta)
    views: dict[str, StorageRef] = {}

    def load(key: str, stype: StorageType, numel: int, location: str, view: Any) -> StorageRef:
        def build(nbytes: int) -> torch.UntypedStorage | None:
            if meta:
                return None
            try:
                storage, _crc = _read_into(f, offsets[key], nbytes)
            except (OSError, EOFError) as err:
                raise CorruptFileError(path, f"reading storage {key!r} failed ({err})") from err
            return storage

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


def scan_torch_stream(path: Path, f: BinaryIO, size: int, *, limits: Limits, collect: Collector) -> None:
    """Run the loader over a torch.save file or a raw pickle in collect mode, tensors on the meta device.

    ``collect`` receives each interpreter after it ran (also when it stopped
    on an error), with the imports it saw and the findings it recorded.

    Raises:
        UnsafeFileError, CorruptFileError, LimitExceededError: as the loader would.
    """
    f.seek(0)
    head = f.read(len(LEGACY_PREFIX))
    f.seek(0)
    if head.startswith(b"PK\x03\x04"):
        _load_zip(path, f, size, device=None, mmap=False, limits=limits, meta=True, collect=collect)
    elif head == LEGACY_PREFIX:
        _load_legacy(path, f, size, device=None, limits=limits, meta=True, collect=collect)
    else:
        # The size is checked before anything is read, and the file is mapped, not read:
        # a 4 GiB limit never means a 4 GiB buffer.
        if size > limits.max_pickle_bytes:
            raise LimitExceededError(
                path, "max_pickle_bytes", size, limits.max_pickle_bytes, what="the pickle"
            )
        if isinstance(f, io.BytesIO):
            _scan_pickle(path, f.getbuffer(), limits=limits, collect=collect)
        elif size == 0:
            raise CorruptFileError(path, "the file is empty (0 bytes)")
        else:
            with mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_READ) as mm:
                _scan_pickle(path, mm, limits=limits, collect=collect)


def _scan_pickle(path: Path, buffer: Any, *, limits: Limits, collect: Collector) -> None:
    if len(buffer) > limits.max_pickle_bytes:  # the file grew since it was measured
        raise LimitExceededError(
            path, "max_pickle_bytes", len(buffer), limits.max_pickle_bytes, what="the pickle"
        )
    unpickler = Unpickler(buffer, path=path, member=None, storages=None, limits=limits, collect=True)
    try:
        result = unpickler.run(allow_trailing=True)
        if not unpickler.findings:
            check_structure(result, path=path, limits=limits)
        if unpickler.end != len(buffer):
            extra = len(buffer) - unpickler.end
            hidden = Finding(
                "structure",
                f"{extra} bytes follow the pickle (a file hidden behind it?)",
                None,
                unpickler.end,
            )
            unpickler.findings.append(hidden)
    finally:
        collect(unpickler)

"""Reading ``torch.save`` files (zip and legacy) without unpickling them.

The archive is checked by :class:`~torchkeep.safety.ziparchive.ZipArchive`,
``data.pkl`` runs on the allowlist :class:`~torchkeep.safety.unpickler.Unpickler`,
and each storage comes straight from its zip record: read into memory that
belongs to the tensor (CRC-checked on the way), or memory-mapped
(``mmap=True``: nothing is read until used, so the CRC is not checked).
Every storage must be exactly as long as its reference says
(``numel * itemsize == record length``), and every tensor view must lie
inside its storage. The legacy (pre-1.6) format is read by
:mod:`~torchkeep.safety.legacy`, the records by :mod:`~torchkeep.safety.records`
and the storages built by :mod:`~torchkeep.safety.storages`.
"""

from __future__ import annotations

import io
import json
import logging
import mmap as mmap_module
import os
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch

from torchkeep.errors import CorruptFileError, LimitExceededError, UnsupportedFormatError
from torchkeep.safety.allowlist import StorageRef, StorageType
from torchkeep.safety.findings import Finding
from torchkeep.safety.legacy import LEGACY_PREFIX, load_legacy
from torchkeep.safety.limits import DEFAULT_LIMITS, Limits
from torchkeep.safety.records import Arena
from torchkeep.safety.storages import Storages
from torchkeep.safety.structure import check_structure
from torchkeep.safety.unpickler import Collector, Unpickler
from torchkeep.safety.ziparchive import ZipArchive

__all__ = [
    "METADATA_RECORD",
    "load_torch_file",
    "read_metadata_record",
    "scan_torch_stream",
    "torch_prefix",
]

logger = logging.getLogger(__name__)

# torchkeep's text metadata in a torch.save zip (torch.load ignores the record)
METADATA_RECORD = "extra/torchkeep_metadata.json"


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
        return load_legacy(
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
    arena = Arena(path, archive, stored) if stored and not mmap and not meta else None
    mapped: list[torch.UntypedStorage] = []
    folder = prefix + "data/"

    def build(key: str, nbytes: int) -> torch.UntypedStorage | None:
        # key matched STORAGE_KEY in Storages.get: a plain name inside the data folder
        member = archive.member(folder + key)
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

    storages = Storages(path, device=device, limits=limits, meta=meta)

    def load(key: str, stype: StorageType, numel: int, location: str, view: Any) -> StorageRef:
        if view is not None:
            raise CorruptFileError(
                path, "a storage view in a zip-format file (only the legacy format has them)"
            )
        return storages.get(key, stype, numel, location, build)

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
        load_legacy(path, f, size, device=None, limits=limits, meta=True, collect=collect)
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

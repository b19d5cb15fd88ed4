"""Telling file formats apart by their bytes, and checking files before reading them.

The suffix of a file in the wild says little (``.bin`` may be anything), so
readers look at the content: a safetensors header, a zip archive (a
``torch.save`` file or a ``torch.export`` program), or the legacy pickle
format. Anything else gets a description of what it seems to be.
"""

from __future__ import annotations

import enum
import functools
import json
import os
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from torchkeep.errors import (
    CorruptFileError,
    LimitExceededError,
    ModelFileNotFoundError,
    PathIsDirectoryError,
    UnknownFormatError,
    UnsupportedSuffixError,
    first_line,
)
from torchkeep.safety.limits import DEFAULT_LIMITS, Limits
from torchkeep.safety.torchfile import LEGACY_PREFIX

__all__ = [
    "FileFormat",
    "SafetensorsHeader",
    "TensorInfo",
    "check_safetensors_header",
    "detect_format",
    "read_safetensors_header",
    "require_file",
    "suffix_format",
]


# safetensors dtype codes, their torch names and item sizes in bits
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("torch.bool", 8),
    "U8": ("torch.uint8", 8),
    "I8": ("torch.int8", 8),
    "U16": ("torch.uint16", 16),
    "I16": ("torch.int16", 16),
    "F16": ("torch.float16", 16),
    "BF16": ("torch.bfloat16", 16),
    "U32": ("torch.uint32", 32),
    "I32": ("torch.int32", 32),
    "F32": ("torch.float32", 32),
    "C64": ("torch.complex64", 64),
    "U64": ("torch.uint64", 64),
    "I64": ("torch.int64", 64),
    "F64": ("torch.float64", 64),
    "F8_E4M3": ("torch.float8_e4m3fn", 8),
    "F8_E4M3FNUZ": ("torch.float8_e4m3fnuz", 8),
    "F8_E5M2": ("torch.float8_e5m2", 8),
    "F8_E5M2FNUZ": ("torch.float8_e5m2fnuz", 8),
    "F8_E8M0": ("torch.float8_e8m0fnu", 8),
    "F4": ("torch.float4_e2m1fn_x2", 4),
}


class FileFormat(str, enum.Enum):
    """The formats torchkeep reads."""

    SAFETENSORS = "safetensors"
    TORCH_ZIP = "torch.save (zip)"
    TORCH_LEGACY = "torch.save (legacy, pre-1.6)"
    TORCH_EXPORT = "torch.export (.pt2)"


WEIGHT_SUFFIXES: dict[str, FileFormat] = {
    ".safetensors": FileFormat.SAFETENSORS,
    ".pt": FileFormat.TORCH_ZIP,
    ".pth": FileFormat.TORCH_ZIP,
    ".bin": FileFormat.TORCH_ZIP,
}


def suffix_format(
    path: Path, suffixes: dict[str, FileFormat] | None = None, *, what: str = "weights"
) -> FileFormat:
    """The format to write ``path`` in, from its suffix.

    Raises:
        UnsupportedSuffixError: the suffix is not one of ``suffixes``.
    """
    table = WEIGHT_SUFFIXES if suffixes is None else suffixes
    fmt = table.get(path.suffix.lower())
    if fmt is None:
        raise UnsupportedSuffixError(path, list(table), what=what)
    return fmt


def require_file(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` is an existing, non-empty regular file.

    Raises:
        ModelFileNotFoundError: it does not exist.
        PathIsDirectoryError: it is a directory.
        CorruptFileError: it is empty.
    """
    p = Path(path)
    if p.is_dir():
        raise PathIsDirectoryError(p)
    if not p.exists():
        raise ModelFileNotFoundError(p)
    if p.stat().st_size == 0:
        raise CorruptFileError(p, "the file is empty (0 bytes)")
    return p


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a file header describes it (no data read)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # where its bytes start, counted from the start of the data section


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, checked header of a safetensors file."""

    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0  # the file offset of the data section


def _looks_like_pickle(head: bytes) -> bool:
    return len(head) > 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _describe_unknown(head: bytes) -> str:
    signatures = {
        b"\x89PNG": "a PNG image",
        b"\xff\xd8\xff": "a JPEG image",
        b"GIF8": "a GIF image",
        b"%PDF": "a PDF document",
        b"\x1f\x8b": "a gzip archive (decompress it first)",
        b"BZh": "a bzip2 archive (decompress it first)",
        b"\xfd7zXZ": "an xz archive (decompress it first)",
        b"\x93NUMPY": "a NumPy .npy array",
        b"\x89HDF": "an HDF5 file (Keras/TensorFlow weights?)",
        b"ONNX": "an ONNX model",
        b"version https://git-lfs": "a Git LFS pointer, not the file itself (run git lfs pull)",
        b"<!DOCTYPE html": "an HTML page (a failed download?)",
        b"<html": "an HTML page (a failed download?)",
    }
    for magic, what in signatures.items():
        if head.startswith(magic):
            return what
    if head.startswith(b"\x80") and len(head) > 1 and head[1] <= 5:
        return "a plain pickle file, not written by torch.save"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of no known format"
    if text.lstrip().startswith(("{", "[")):
        return "a JSON text file"
    return "a text file"


def _check_zip(path: Path) -> FileFormat:
    from torchkeep.safety.ziparchive import ZipArchive

    with path.open("rb") as f:
        names = list(ZipArchive(path, f, path.stat().st_size, limits=DEFAULT_LIMITS).members)
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return FileFormat.TORCH_ZIP
    if any(n.endswith("/archive_format") or n.endswith("models/model.json") for n in names):
        return FileFormat.TORCH_EXPORT
    raise UnknownFormatError(path, "a zip archive that torch did not write")


def detect_format(path: str | os.PathLike[str]) -> FileFormat:
    """The format of the file at ``path``, from its content (the suffix is ignored).

    Args:
        path (str | PathLike): the file.

    Returns:
        A :class:`FileFormat`.

    Raises:
        ModelFileNotFoundError, PathIsDirectoryError: the path is not a file.
        CorruptFileError: a known format, but damaged or truncated.
        UnsafeFileError: a zip archive built to fool readers.
        UnknownFormatError: not a model file.

    Example:
        >>> torchkeep.detect_format("pytorch_model.bin")
        <FileFormat.TORCH_ZIP: 'torch.save (zip)'>
    """
    p = require_file(path)
    with p.open("rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        return _check_zip(p)
    if head.startswith(LEGACY_PREFIX) or _looks_like_pickle(head):
        # A plain pickle goes to the same allowlist reader: it refuses a hostile one as
        # UnsafeFileError and a harmless one as "not a torch.save file".
        return FileFormat.TORCH_LEGACY
    if len(head) >= 9 and head[8:9] == b"{":
        read_safetensors_header(p)
        return FileFormat.SAFETENSORS
    if head.startswith(b"PK\x05\x06"):
        raise CorruptFileError(p, "it is an empty zip archive")
    raise UnknownFormatError(p, _describe_unknown(head))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    table = dict(pairs)
    if len(table) != len(pairs):
        keys = [k for k, _ in pairs]
        raise _DuplicateKey(next(k for k in keys if keys.count(k) > 1))
    return table


class _DuplicateKey(ValueError):
    pass


# Unicode categories a tensor name never needs and attackers use to disguise one
# (control characters, bidi overrides, zero-width and other format characters).
_UNPRINTABLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _printable(name: str) -> bool:
    if name.isascii():  # the usual case, decided in C
        return name.isprintable()
    return all(unicodedata.category(c) not in _UNPRINTABLE for c in name)


def _parse_tensor_entry(
    path: Path, name: str, entry: Any, limits: Limits
) -> tuple[TensorInfo, tuple[int, int]]:
    if not _printable(name):
        raise CorruptFileError(path, f"tensor name {name!r} contains control or invisible characters")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CorruptFileError(path, f"the header entry for {name!r} is malformed")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise CorruptFileError(path, f"tensor {name!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CorruptFileError(path, f"tensor {name!r} has an invalid shape {shape!r:.80}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CorruptFileError(path, f"tensor {name!r} has invalid data offsets {offsets!r:.80}")
    numel = 1
    for d in shape:
        numel *= d
        if numel > limits.max_numel:
            raise LimitExceededError(path, "max_numel", numel, limits.max_numel, what=f"tensor {name!r}")
    torch_name, bits = SAFETENSORS_DTYPES[dtype]
    nbytes = (numel * bits + 7) // 8
    if offsets[1] - offsets[0] != nbytes:
        raise CorruptFileError(
            path, f"tensor {name!r} claims {offsets[1] - offsets[0]} bytes but its shape needs {nbytes}"
        )
    return TensorInfo(name, torch_name, tuple(shape), nbytes, offsets[0]), (offsets[0], offsets[1])


def _check_metadata_section(path: Path, metadata: Any, limits: Limits) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptFileError(path, "__metadata__ is not a mapping of strings to strings")
    if len(metadata) > limits.max_metadata:
        raise LimitExceededError(
            path, "max_metadata", len(metadata), limits.max_metadata, what="__metadata__"
        )
    for key in metadata:
        if not _printable(key):
            raise CorruptFileError(path, f"metadata key {key!r} contains control or invisible characters")
    return dict(metadata)


def read_safetensors_header(
    path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS
) -> SafetensorsHeader:
    """Parse and check a safetensors header without reading tensor data.

    Stricter than the safetensors library: the header must be one JSON object
    (padding spaces allowed) without duplicate keys; tensor names printable;
    ``__metadata__`` strings only; and the tensors' byte ranges, sorted, must
    tile the data section exactly: no gaps, overlaps or trailing bytes, so no
    byte of the file is left unexplained.

    Args:
        path (str | PathLike): the file.
        limits (Limits): header size, element count and metadata bounds.

    Raises:
        CorruptFileError: the header is broken, the ranges do not tile the
            data, or the file is truncated.
        LimitExceededError: the header or a shape is larger than ``limits`` allow.
    """
    p = require_file(path)
    stat = p.stat()
    # detect_format and the loader both ask; a header of 2000 tensors takes ~20 ms to check
    return _cached_header(str(p.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, limits, p)


@functools.lru_cache(maxsize=16)
def _cached_header(
    resolved: str, size: int, mtime_ns: int, inode: int, limits: Limits, p: Path
) -> SafetensorsHeader:
    with p.open("rb") as f:
        return check_safetensors_header(p, f, size, limits=limits)


def check_safetensors_header(p: Path, f: BinaryIO, size: int, *, limits: Limits) -> SafetensorsHeader:
    """:func:`read_safetensors_header` on an open stream of ``size`` bytes (``p`` names it in errors)."""
    f.seek(0)
    raw_len = f.read(8)
    if len(raw_len) < 8:
        raise CorruptFileError(p, "the file is shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", raw_len)
    if header_len > limits.max_header_bytes:
        raise LimitExceededError(
            p, "max_header_bytes", header_len, limits.max_header_bytes, what="the safetensors header"
        )
    if header_len > size - 8:
        raise CorruptFileError(
            p, f"the header claims {header_len} bytes but the file has only {size - 8} after it"
        )
    raw = f.read(header_len)
    if not raw.startswith(b"{"):
        raise CorruptFileError(p, "the safetensors header does not start with '{'")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as err:
        raise CorruptFileError(p, f"the safetensors header lists {err.args[0]!r} twice") from err
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CorruptFileError(p, f"the safetensors header is not valid JSON ({first_line(err)})") from err
    if not isinstance(header, dict):
        raise CorruptFileError(p, "the safetensors header is not a JSON object")
    metadata = _check_metadata_section(p, header.pop("__metadata__", None), limits)
    infos: list[TensorInfo] = []
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        info, (begin, end) = _parse_tensor_entry(p, name, entry, limits)
        infos.append(info)
        ranges.append((begin, end, name))
    available = size - 8 - header_len
    at = 0
    for begin, end, name in sorted(ranges):
        if begin != at:
            what = (
                "overlaps the previous tensor"
                if begin < at
                else f"leaves {begin - at} unexplained bytes before it"
            )
            raise CorruptFileError(p, f"tensor {name!r} {what} (data offsets must tile the data section)")
        at = end
    if at > available:
        raise CorruptFileError(
            p, f"the file is truncated: tensors need {at} bytes of data, only {available} are there"
        )
    if at < available:
        raise CorruptFileError(p, f"{available - at} bytes follow the last tensor (trailing data)")
    return SafetensorsHeader(tuple(infos), metadata, 8 + header_len)

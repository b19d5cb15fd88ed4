"""safetensors: the structural sniff, and the strict header checks every reader relies on.

A safetensors file is an 8-byte little-endian header length N, N bytes of
JSON starting with ``{`` (padded with spaces), then the tensor data. The
sniff (:func:`claims`) looks at all of that, never at one byte: a header
whose length happens to start with ``0x80 0x02`` is still safetensors.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from torchkeep.errors import CorruptFileError, LimitExceededError, first_line
from torchkeep.formats.base import TensorInfo, require_file
from torchkeep.safety.aliases import check_aliases
from torchkeep.safety.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "SAFETENSORS_DTYPES",
    "SafetensorsHeader",
    "check_safetensors_header",
    "claims",
    "read_safetensors_header",
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


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, checked header of a safetensors file."""

    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0  # the file offset of the data section


def claims(f: BinaryIO, head: bytes, size: int) -> bool:
    """Whether the bytes are laid out as a safetensors file: a length that fits and a JSON object.

    ``head`` is the file's first bytes (at least 9 when the file has them).
    The header must start with ``{`` and, once its padding spaces are
    dropped, end with ``}``; its content is checked by
    :func:`check_safetensors_header`.
    """
    if len(head) < 10 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack_from("<Q", head)
    if length < 2 or length > size - 8:
        return False
    end = 8 + length
    while end > 9:  # the padding may be long: walk back over it a block at a time
        start = max(9, end - 4096)
        f.seek(start)
        block = f.read(end - start).rstrip(b" ")
        if block:
            return block.endswith(b"}")
        end = start
    return False


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    table = dict(pairs)
    if len(table) != len(pairs):
        keys = [k for k, _ in pairs]
        raise _DuplicateKey(next(k for k in keys if keys.count(k) > 1))
    return table


class _DuplicateKey(ValueError):
    pass


class _BadNumber(ValueError):
    pass


def _header_int(text: str) -> int:
    # offsets and dims are u64 (at most 20 digits); longer ones would only cost time to convert
    if len(text.lstrip("-")) > 20:
        raise _BadNumber(f"an integer of {len(text)} digits (offsets and dimensions fit in 64 bits)")
    return int(text)


def _no_constant(text: str) -> Any:
    raise _BadNumber(f"{text}, which JSON does not allow")


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
        header = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_int=_header_int,
            parse_constant=_no_constant,
        )
    except _DuplicateKey as err:
        raise CorruptFileError(p, f"the safetensors header lists {err.args[0]!r} twice") from err
    except _BadNumber as err:
        raise CorruptFileError(p, f"the safetensors header holds {err.args[0]}") from err
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
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
    # tied-key aliases are part of what a header says a file holds: checked here, for every reader
    check_aliases(p, [info.name for info in infos], metadata)
    return SafetensorsHeader(tuple(infos), metadata, 8 + header_len)

"""NumPy ``.npy`` arrays (alone or in an ``.npz`` zip): the header, parsed by pattern, never evaluated.

numpy writes the header as a Python dict literal; ``numpy.load`` reads it with
``ast.literal_eval``. Here it must match the exact shape numpy writes (keys in
order, a dtype string or a structured list, a tuple of integers), so nothing
in it is ever evaluated, and its shape must account for every byte after it.
An array of dtype ``object`` holds a pickle (``numpy.load(allow_pickle=True)``
would run it): :attr:`NpyHeader.is_object` says so and the scan reads it.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from torchkeep.errors import CorruptFileError, LimitExceededError
from torchkeep.safety.limits import Limits

__all__ = ["NPY_MAGIC", "NpyHeader", "read_npy_header"]

NPY_MAGIC = b"\x93NUMPY"
_MAX_HEADER = 1 << 16
_HEADER = re.compile(
    r"\{'descr': (?P<descr>'[^']{1,64}'|\[.{0,60000}\]), 'fortran_order': (?:True|False), "
    r"'shape': \((?P<shape>(?:[0-9]{1,20}, ?)*(?:[0-9]{1,20},?)?)\), \}[ ]*\n?"
)
_DESCR_SIZE = re.compile(r"[<>|=]?([biufcmMSUV])(\d{1,6})")


@dataclass(frozen=True)
class NpyHeader:
    """The parsed header of one ``.npy`` array.

    Attributes:
        descr: the dtype as numpy wrote it (``'<f4'``, or a structured list).
        shape: the array's shape.
        data_start: where the array's bytes start (from the start of the array).
        is_object: the dtype holds Python objects: the data is a pickle.
    """

    descr: str
    shape: tuple[int, ...]
    data_start: int
    is_object: bool


def read_npy_header(
    path: Path, f: BinaryIO, size: int, *, limits: Limits, member: str | None = None
) -> NpyHeader:
    """Parse and check the header of the ``.npy`` array in ``f`` (``size`` bytes from its start).

    Raises:
        CorruptFileError: not a ``.npy`` array, a malformed header, or data of
            another size than the header declares.
        LimitExceededError: more elements than ``limits.max_numel``.
    """
    where = f"member {member!r}" if member else "the array"
    f.seek(0)
    head = f.read(12)
    if len(head) < 10 or not head.startswith(NPY_MAGIC):
        raise CorruptFileError(path, f"{where} is not a .npy array", member=member)
    major = head[6]
    if major == 1:
        (header_len,) = struct.unpack_from("<H", head, 8)
        start = 10
    elif major in {2, 3} and len(head) == 12:
        (header_len,) = struct.unpack_from("<I", head, 8)
        start = 12
    else:
        raise CorruptFileError(path, f"{where} has an unknown .npy version {major}", member=member)
    if header_len > _MAX_HEADER or start + header_len > size:
        raise CorruptFileError(path, f"{where} has a broken .npy header", member=member)
    f.seek(start)
    text = f.read(header_len).decode("latin1")
    match = _HEADER.fullmatch(text)
    if match is None:
        raise CorruptFileError(path, f"{where} has a malformed .npy header", member=member)
    descr = match.group("descr")
    shape = tuple(int(d) for d in match.group("shape").replace(" ", "").split(",") if d)
    body = start + header_len
    is_object = "'O" in descr or "|O" in descr
    header = NpyHeader(descr, shape, body, is_object)
    if is_object:
        return header
    numel = 1
    for d in shape:
        numel *= d
        if numel > limits.max_numel:
            raise LimitExceededError(path, "max_numel", numel, limits.max_numel, what=where)
    item = _DESCR_SIZE.fullmatch(descr.strip("'"))
    if item:  # structured dtypes are not sized here; their bytes are never interpreted
        itemsize = int(item.group(2)) * (4 if item.group(1) == "U" else 1)
        if numel * itemsize != size - body:
            raise CorruptFileError(
                path,
                f"{where} should hold {numel * itemsize} bytes of data, it holds {size - body}",
                member=member,
            )
    return header

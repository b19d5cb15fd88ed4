"""A strict zip reader for ``torch.save`` archives (and ``.npz``).

Python's :mod:`zipfile` is forgiving: it finds the central directory wherever
it sits, accepts bytes before the first record, and trusts the central
directory's names without comparing them to the local headers. Attackers use
exactly those gaps to show one reader a harmless file and another a payload.
This reader accepts only archives in which every view agrees:

* the file starts with the first local header and ends with the end-of-central-
  directory record (no prefix, no trailing bytes, no comment games);
* every central entry's local header carries the same name, method and flags;
* names are unique, relative, without ``..``, backslashes or control characters,
  and unique also when compared the way torch's reader (miniz) compares them:
  ``mz_zip_reader_locate_file`` without ``MZ_ZIP_FLAG_CASE_SENSITIVE``
  ignores ASCII case, so ``archive/DATA.PKL`` is torch's ``archive/data.pkl``.
  Names are compared by :func:`_fold` (NFKC and ``str.casefold``, a superset
  of miniz's ASCII folding), and a name that folds to a ``<folder>/data.pkl``
  must be spelled exactly so (torch would load it, we would not find it);
* records lie inside the file, in order, without overlapping or hidden gaps;
* no encryption; STORED, or DEFLATE under a ratio cap; CRC-32 checked on read.
"""

from __future__ import annotations

import collections
import io
import os
import re
import struct
import unicodedata
import zlib
from pathlib import Path
from typing import BinaryIO, NamedTuple

from torchkeep.errors import CorruptFileError, LimitExceededError, UnsafeFileError
from torchkeep.safety.crc import crc32
from torchkeep.safety.limits import Limits

__all__ = ["ZipArchive", "ZipMember"]

_LOCAL = b"PK\x03\x04"
_CENTRAL = b"PK\x01\x02"
_EOCD = b"PK\x05\x06"
_EOCD64 = b"PK\x06\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_DESCRIPTOR = b"PK\x07\x08"
_LOCAL_SIZE = 30
_CENTRAL_SIZE = 46
_EOCD_SIZE = 22
_EOCD64_SIZE = 56
_LOCATOR_SIZE = 20
_MAX_COMMENT = 0xFFFF
_STORED = 0
_DEFLATED = 8
_FLAG_ENCRYPTED = 0x1
_FLAG_DESCRIPTOR = 0x8
_FLAG_STRONG_ENCRYPTION = 0x40
_FLAG_UTF8 = 0x800
_U32_MAX = 0xFFFFFFFF
_U16_MAX = 0xFFFF
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL_HEADER = struct.Struct("<4sHHHHHHIIIHHHHHII")
# A data descriptor (at most 24 bytes) ends right where the next local header starts: each header
# is read with the bytes before it, so checking the layout reads nothing more
_BEFORE = 24
_DESCRIPTOR_GAPS = frozenset({12, 16, 20, 24})
_NO_GAP = frozenset({0})
_DESCRIPTOR32 = struct.Struct("<III")
_DESCRIPTOR64 = struct.Struct("<IQQ")


class ZipMember(NamedTuple):
    """One checked record of the archive (a named tuple: 2000 of them are made per archive)."""

    name: str
    header_offset: int
    data_offset: int
    compressed_size: int
    size: int
    crc: int
    method: int

    @property
    def stored(self) -> bool:
        """Whether the bytes sit in the file as they are (no compression)."""
        return self.method == _STORED


_TableKey = tuple[str, int, int, int, Limits]
_TABLES: collections.OrderedDict[_TableKey, tuple[dict[str, ZipMember], dict[str, int]]] = (
    collections.OrderedDict()
)
_TABLES_KEPT = 16


def _checked_table(archive: ZipArchive, key: _TableKey) -> tuple[dict[str, ZipMember], dict[str, int]]:
    """The archive's checked members and flags, parsed once per (path, inode, size, mtime, limits)."""
    found = _TABLES.get(key)
    if found is None:
        found = archive._parse()  # raises for a bad archive; nothing is kept then
        _TABLES[key] = found
        while len(_TABLES) > _TABLES_KEPT:
            _TABLES.popitem(last=False)
    return dict(found[0]), dict(found[1])


def _header_offset(member: ZipMember) -> int:
    return member.header_offset


def _fold(name: str) -> str:
    """The form under which two member names are one record to some zip reader.

    miniz (torch's reader) folds ASCII case only; NFKC plus casefold also
    catches readers that fold Unicode case or normalise (``K`` and the Kelvin
    sign). Backslashes are refused outright by :func:`_bad_name`.
    """
    if name.isascii():  # NFKC leaves ASCII as it is, and casefold() of ASCII is lower(): 4x faster
        return name.lower()
    return unicodedata.normalize("NFKC", name).casefold()


def _bad_name(name: str) -> str | None:
    if not name:
        return "an empty name"
    if name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return "an absolute or Windows-style path"
    # a '.' or '..' component starts the name or follows a slash (most names have neither: no split)
    if (name[0] == "." or "/." in name) and {".", ".."} & set(name.split("/")):
        return "a '..' or '.' path component (a path-escaping 'zip slip' name)"
    # printable ASCII has no control characters; anything else goes through the pattern
    if not (name.isascii() and name.isprintable()) and _CONTROL.search(name):
        return "control characters"
    return None


class ZipArchive:
    """The checked table of contents of a zip file; reads members on request.

    Raises (from the constructor):
        CorruptFileError: the archive is broken or its parts disagree.
        UnsafeFileError: the archive uses tricks no benign writer needs
            (encryption, prefixed data, mismatched or escaping names).
        LimitExceededError: more members or bytes than ``limits`` allow.
    """

    def __init__(self, path: Path, stream: BinaryIO, size: int, *, limits: Limits) -> None:
        self.path = path
        self._f = stream
        self._size = size
        self._limits = limits
        # a file is read with pread: no seek, no buffer fill, and the stream's position is left alone.
        # (Thousands of headers through a map were slower here: a page fault per header, and unmapping.)
        self._fd = stream.fileno() if isinstance(stream, io.BufferedReader | io.FileIO) else None
        if not (size and self._fd is not None):
            self.members, self._flags = self._parse()
            return
        # detect_format and the loader both open the same file: its checked table is kept,
        # keyed by what changes when the file does (a 2000-member archive takes ~25 ms)
        st = os.fstat(stream.fileno())
        self.members, self._flags = _checked_table(
            self, (str(path), st.st_ino, st.st_size, st.st_mtime_ns, limits)
        )

    def _parse(self) -> tuple[dict[str, ZipMember], dict[str, int]]:
        self.members = {}
        self._flags = {}
        self._folded: dict[str, str] = {}
        # header offset -> the bytes just before it (where the previous record's descriptor ends)
        self._before: dict[int, bytes] = {}
        try:
            cd_offset, cd_size, count, cd_end = self._find_directory()
            self._parse_directory(cd_offset, cd_size, count)
            self._check_layout(cd_offset, cd_end)
        finally:
            self._before = {}
        return self.members, self._flags

    # -- directory -------------------------------------------------------------

    def _corrupt(self, reason: str, *, offset: int | None = None) -> CorruptFileError:
        return CorruptFileError(self.path, reason, member=None, offset=offset)

    def _unsafe(
        self, reason: str, *, member: str | None = None, offset: int | None = None
    ) -> UnsafeFileError:
        return UnsafeFileError(self.path, reason=reason, member=member, offset=offset)

    def _read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self._size:
            raise self._corrupt(
                f"a record points outside the file (bytes {offset}..{offset + length})", offset=offset
            )
        if self._fd is not None:
            data = os.pread(self._fd, length, offset)
        else:
            self._f.seek(offset)
            data = self._f.read(length)
        if len(data) != length:
            raise self._corrupt("the file is shorter than its records claim", offset=offset)
        return data

    def _find_directory(self) -> tuple[int, int, int, int]:
        if self._size < _EOCD_SIZE + _LOCAL_SIZE:
            raise self._corrupt("the zip archive is too short to hold a record")
        if self._read_at(0, 4) != _LOCAL:
            raise self._unsafe("the file does not start with a zip record (data hidden before the archive)")
        tail_len = min(self._size, _EOCD_SIZE + _MAX_COMMENT)
        tail = self._read_at(self._size - tail_len, tail_len)
        eocd_at = -1
        pos = tail.rfind(_EOCD)
        while pos >= 0:
            fits = pos + _EOCD_SIZE <= len(tail)
            if fits and pos + _EOCD_SIZE + struct.unpack_from("<H", tail, pos + 20)[0] == len(tail):
                eocd_at = self._size - tail_len + pos
                break
            pos = tail.rfind(_EOCD, 0, pos)
        if eocd_at < 0:
            raise self._corrupt("the zip archive is truncated (no end-of-directory record at its end)")
        eocd = self._read_at(eocd_at, _EOCD_SIZE)
        _, disk, cd_disk, n_disk, count, cd_size, cd_offset, _ = struct.unpack("<4sHHHHIIH", eocd)
        if disk != 0 or cd_disk != 0 or n_disk != count:
            raise self._corrupt("the zip archive claims to span several disks")
        cd_end = eocd_at
        if (
            count == _U16_MAX
            or cd_size == _U32_MAX
            or cd_offset == _U32_MAX
            or (eocd_at >= _LOCATOR_SIZE and self._read_at(eocd_at - _LOCATOR_SIZE, 4) == _EOCD64_LOCATOR)
        ):
            cd_offset, cd_size, count, cd_end = self._zip64_directory(eocd_at)
        if count > self._limits.max_tensors + 64:
            raise LimitExceededError(self.path, "max_tensors", count, self._limits.max_tensors)
        if cd_offset + cd_size != cd_end:
            raise self._corrupt(
                f"the central directory ({cd_size} bytes at {cd_offset}) does not end where the "
                f"end record starts ({cd_end})",
                offset=cd_offset,
            )
        return cd_offset, cd_size, count, cd_end

    def _zip64_directory(self, eocd_at: int) -> tuple[int, int, int, int]:
        if eocd_at < _LOCATOR_SIZE:
            raise self._corrupt("a zip64 archive without its zip64 locator")
        locator = self._read_at(eocd_at - _LOCATOR_SIZE, _LOCATOR_SIZE)
        sig, disk, eocd64_at, disks = struct.unpack("<4sIQI", locator)
        if sig != _EOCD64_LOCATOR or disk != 0 or disks != 1:
            raise self._corrupt("the zip64 locator is broken", offset=eocd_at - _LOCATOR_SIZE)
        if eocd64_at + _EOCD64_SIZE != eocd_at - _LOCATOR_SIZE:
            raise self._corrupt("the zip64 end record is not where its locator says", offset=eocd64_at)
        record = self._read_at(eocd64_at, _EOCD64_SIZE)
        sig, rec_size, _, _, disk, cd_disk, n_disk, count, cd_size, cd_offset = struct.unpack(
            "<4sQHHIIQQQQ", record
        )
        if sig != _EOCD64 or rec_size != _EOCD64_SIZE - 12 or disk or cd_disk or n_disk != count:
            raise self._corrupt("the zip64 end record is broken", offset=eocd64_at)
        return cd_offset, cd_size, count, eocd64_at

    def _parse_directory(self, cd_offset: int, cd_size: int, count: int) -> None:
        directory = self._read_at(cd_offset, cd_size)
        pos = 0
        for _ in range(count):
            if pos + _CENTRAL_SIZE > len(directory) or directory[pos : pos + 4] != _CENTRAL:
                raise self._corrupt("the central directory is broken", offset=cd_offset + pos)
            (
                _,
                _made_by,
                _needed,
                flags,
                method,
                _time,
                _date,
                crc,
                csize,
                usize,
                name_len,
                extra_len,
                comment_len,
                disk,
                _int_attr,
                _ext_attr,
                local_offset,
            ) = _CENTRAL_HEADER.unpack_from(directory, pos)
            start = pos + _CENTRAL_SIZE
            end = start + name_len + extra_len + comment_len
            if end > len(directory):
                raise self._corrupt(
                    "a central directory entry runs past the directory", offset=cd_offset + pos
                )
            raw_name = directory[start : start + name_len]
            extra = directory[start + name_len : start + name_len + extra_len]
            name = self._decode_name(raw_name, flags, cd_offset + pos)
            if extra:
                usize, csize, local_offset = self._apply_zip64(extra, usize, csize, local_offset, name)
            if disk not in {0, _U16_MAX}:
                raise self._corrupt(f"member {name!r} claims to live on another disk")
            self._add_member(name, flags, method, crc, csize, usize, local_offset)
            pos = end
        if pos != len(directory):
            raise self._corrupt(
                "the central directory has bytes after its last entry", offset=cd_offset + pos
            )

    def _decode_name(self, raw: bytes, flags: int, offset: int) -> str:
        try:
            name = raw.decode("utf-8") if flags & _FLAG_UTF8 else raw.decode("ascii")
        except UnicodeDecodeError as err:
            raise self._corrupt(f"a member name is not valid text ({err})", offset=offset) from err
        problem = _bad_name(name)
        if problem:
            raise self._unsafe(f"member name {name!r} has {problem}", member=name, offset=offset)
        return name

    def _apply_zip64(
        self, extra: bytes, usize: int, csize: int, offset: int, name: str
    ) -> tuple[int, int, int]:
        pos = 0
        while pos + 4 <= len(extra):
            tag, length = struct.unpack_from("<HH", extra, pos)
            body = extra[pos + 4 : pos + 4 + length]
            if len(body) != length:
                raise self._corrupt(f"member {name!r} has a broken extra field")
            if tag == 0x0001:
                fields = [v for v in (usize, csize, offset) if v == _U32_MAX]
                values = list(struct.unpack_from(f"<{min(len(fields), length // 8)}Q", body))
                if len(values) < len(fields):
                    raise self._corrupt(f"member {name!r} has a short zip64 field")
                if usize == _U32_MAX:
                    usize = values.pop(0)
                if csize == _U32_MAX:
                    csize = values.pop(0)
                if offset == _U32_MAX:
                    offset = values.pop(0)
            pos += 4 + length
        return usize, csize, offset

    def _add_member(
        self, name: str, flags: int, method: int, crc: int, csize: int, usize: int, local_offset: int
    ) -> None:
        if flags & (_FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION):
            raise self._unsafe(f"member {name!r} is encrypted", member=name)
        if name in self.members:
            raise self._unsafe(f"the archive holds two members named {name!r}", member=name)
        folded = _fold(name)
        other = self._folded.get(folded)
        if other is not None:
            raise self._unsafe(
                f"the archive holds members {other!r} and {name!r}, whose names differ only in case or "
                "Unicode form: torch.load finds records case-insensitively and could read the other one",
                member=name,
            )
        self._folded[folded] = name
        if folded.endswith("/data.pkl") and folded.count("/") == 1 and not name.endswith("/data.pkl"):
            raise self._unsafe(
                f"member {name!r} is data.pkl spelled in another case: torch.load would unpickle it, "
                "while readers that compare names exactly see no pickle",
                member=name,
            )
        if method == _STORED:
            if csize != usize:
                raise self._corrupt(f"stored member {name!r} has different stored and real sizes")
        elif method == _DEFLATED:
            if usize > self._limits.max_bytes:
                raise LimitExceededError(self.path, "max_bytes", usize, self._limits.max_bytes)
            if usize > max(csize, 1) * self._limits.max_compression_ratio:
                raise LimitExceededError(
                    self.path,
                    "max_compression_ratio",
                    usize // max(csize, 1),
                    self._limits.max_compression_ratio,
                    what=f"member {name!r} (a decompression bomb?)",
                )
        else:
            raise CorruptFileError(
                self.path,
                f"member {name!r} uses compression method {method}; torch writes only stored records",
            )
        encoded = name.encode("utf-8")
        # the header and the name it should carry in one read (a 2000-member archive reads 2000),
        # with the bytes before it, where the previous record's data descriptor ends
        span = _LOCAL_SIZE + len(encoded)
        before = min(_BEFORE, local_offset)
        if local_offset + span <= self._size:
            window = self._read_at(local_offset - before, before + span)
            self._before[local_offset] = window[:before]
            header = window[before:]
        else:
            header = self._read_at(local_offset, _LOCAL_SIZE)
        sig, _, l_flags, l_method, _, _, _, _, _, l_name_len, l_extra_len = _LOCAL_HEADER.unpack_from(header)
        if sig != _LOCAL:
            raise self._corrupt(f"member {name!r} points to no local header", offset=local_offset)
        if l_name_len == len(encoded) and len(header) == span:
            local_name = header[_LOCAL_SIZE:]
        else:
            local_name = self._read_at(local_offset + _LOCAL_SIZE, l_name_len)
        if local_name != encoded:
            raise self._unsafe(
                f"member {name!r} is called {local_name!r} in its local header (two readers would see "
                "different files)",
                member=name,
                offset=local_offset,
            )
        if l_method != method or (l_flags & _FLAG_ENCRYPTED) != (flags & _FLAG_ENCRYPTED):
            raise self._unsafe(
                f"member {name!r} has a local header that disagrees with the directory", member=name
            )
        data_offset = local_offset + _LOCAL_SIZE + l_name_len + l_extra_len
        if data_offset + csize > self._size:
            raise self._corrupt(f"member {name!r} runs past the end of the file", offset=data_offset)
        self.members[name] = ZipMember(name, local_offset, data_offset, csize, usize, crc, method)
        self._flags[name] = l_flags

    def _check_layout(self, cd_offset: int, cd_end: int) -> None:
        ordered = sorted(self.members.values(), key=_header_offset)
        if not ordered or ordered[0].header_offset != 0:
            raise self._unsafe("the first member does not start at the beginning of the file")
        flags = self._flags
        for current, following in zip(ordered, [*ordered[1:], None], strict=True):
            end = current.data_offset + current.compressed_size
            next_start = following.header_offset if following else cd_offset
            gap = next_start - end
            allowed = _DESCRIPTOR_GAPS if flags[current.name] & _FLAG_DESCRIPTOR else _NO_GAP
            if gap not in allowed:
                what = "overlaps the next record" if gap < 0 else f"is followed by {gap} unexplained bytes"
                raise self._unsafe(f"member {current.name!r} {what}", member=current.name, offset=end)
            if gap:
                self._check_descriptor(current, end, gap)

    def _check_descriptor(self, member: ZipMember, at: int, length: int) -> None:
        known = self._before.get(at + length, b"")
        raw = known[len(known) - length :] if len(known) >= length else self._read_at(at, length)
        body = raw[4:] if raw.startswith(_DESCRIPTOR) else raw
        if len(body) not in {12, 20}:
            raise self._corrupt(f"member {member.name!r} has a malformed data descriptor", offset=at)
        crc, csize, usize = (_DESCRIPTOR64 if len(body) == 20 else _DESCRIPTOR32).unpack(body)
        if crc != member.crc or (csize, usize) != (member.compressed_size, member.size):
            raise self._unsafe(
                f"member {member.name!r} has a data descriptor that disagrees with the directory",
                member=member.name,
                offset=at,
            )

    # -- reading ---------------------------------------------------------------

    def read(self, name: str, *, max_size: int | None = None) -> bytes:
        """The whole content of member ``name``, CRC-checked.

        Raises:
            CorruptFileError: the member is missing or its CRC does not match.
            LimitExceededError: it is larger than ``max_size``.
        """
        member = self.member(name)
        if max_size is not None and member.size > max_size:
            raise LimitExceededError(
                self.path, "max_pickle_bytes", member.size, max_size, what=f"member {name!r}"
            )
        raw = self._read_at(member.data_offset, member.compressed_size)
        if member.method == _DEFLATED:
            decompressor = zlib.decompressobj(-15)
            try:
                data = decompressor.decompress(raw, member.size)
            except zlib.error as err:
                raise CorruptFileError(self.path, f"member {name!r} does not decompress ({err})") from err
            if len(data) != member.size or decompressor.unconsumed_tail or not decompressor.eof:
                raise CorruptFileError(
                    self.path, f"member {name!r} decompresses to another size than declared"
                )
        else:
            data = raw
        self.check_crc(member, crc32(data))
        return data

    def check_crc(self, member: ZipMember, crc: int) -> None:
        """Raise :class:`CorruptFileError` unless ``crc`` is the member's recorded CRC-32."""
        if crc != member.crc:
            raise CorruptFileError(
                self.path,
                f"member {member.name!r} fails its CRC-32 check (recorded {member.crc:08x}, got {crc:08x})",
                member=member.name,
                offset=member.data_offset,
            )

    def member(self, name: str) -> ZipMember:
        """The checked record called ``name``.

        Raises:
            CorruptFileError: there is no such record.
        """
        try:
            return self.members[name]
        except KeyError:
            raise CorruptFileError(self.path, f"the archive has no record {name!r}", member=name) from None

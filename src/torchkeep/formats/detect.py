"""The one place that decides what a file is: loaders, ``scan``, ``summarize`` and the CLI all ask here.

Each format is tried in a fixed order with a full structural check, never
one byte: a zip archive is parsed by the strict reader and classified by its
members; a safetensors file needs a length that fits the file and a JSON
object where the length says; a pickle needs its PROTO opcode. A file two
formats claim (a safetensors file whose bytes also run as a pickle) is
refused, since ``torch.load`` would read it one way and torchkeep another.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from torchkeep.errors import CorruptFileError, UnknownFormatError, UnsafeFileError
from torchkeep.formats import numpy, pickles, safetensors
from torchkeep.formats.base import FileFormat, require_file
from torchkeep.safety.limits import DEFAULT_LIMITS, Limits

__all__ = ["LOADABLE", "detect_format", "sniff", "zip_kind"]

# What the loaders read; the rest is known to scan only.
LOADABLE = frozenset(
    {
        FileFormat.SAFETENSORS,
        FileFormat.TORCH_ZIP,
        FileFormat.TORCH_LEGACY,
        FileFormat.TORCH_EXPORT,
        FileFormat.PICKLE,
    }
)


@dataclass(frozen=True)
class _Bytes:
    path: Path
    f: BinaryIO
    head: bytes
    size: int
    limits: Limits


def zip_kind(path: Path, names: list[str]) -> FileFormat:
    """What a zip archive is, from its (already checked) member names.

    A ``torch.save`` archive keeps everything under one folder with a
    ``data.pkl`` in it; a ``torch.export`` program has ``archive_format`` at
    the same depth; an ``.npz`` holds only ``.npy`` members.

    Raises:
        UnsafeFileError: the archive is both a torch.save file and a program.
        UnknownFormatError: none of these.
    """
    top = {n for n in names if n.count("/") == 1}
    torch_zip = any(n.endswith("/data.pkl") for n in top)
    program = any(n.endswith("/archive_format") for n in top) or any(
        n.endswith("/models/model.json") and n.count("/") == 2 for n in names
    )
    if torch_zip and program:
        raise UnsafeFileError(
            path,
            reason="is both a torch.save archive (data.pkl) and a torch.export program "
            "(archive_format): torch.load and torch.export.load would read different things",
        )
    if torch_zip:
        return FileFormat.TORCH_ZIP
    if program:
        return FileFormat.TORCH_EXPORT
    if names and all(n.endswith(".npy") for n in names):
        return FileFormat.NUMPY_ZIP
    raise UnknownFormatError(path, "a zip archive that torch did not write")


def _zip(b: _Bytes) -> FileFormat | None:
    if b.head.startswith(b"PK\x05\x06"):
        raise CorruptFileError(b.path, "it is an empty zip archive")
    if not b.head.startswith(b"PK\x03\x04"):
        return None
    from torchkeep.safety.ziparchive import ZipArchive

    archive = ZipArchive(b.path, b.f, b.size, limits=b.limits)
    return zip_kind(b.path, list(archive.members))


def _numpy(b: _Bytes) -> FileFormat | None:
    return FileFormat.NUMPY if b.head.startswith(numpy.NPY_MAGIC) else None


def _polyglot(b: _Bytes, claimed: str) -> None:
    action = pickles.runs_as_pickle(b.f)
    if action is not None:
        raise UnsafeFileError(
            b.path,
            reason=f"is laid out as {claimed} but its bytes also read as a pickle that acts "
            f"({action}): torch.load or pickle.load could run it",
        )


def _safetensors(b: _Bytes) -> FileFormat | None:
    if safetensors.claims(b.f, b.head, b.size):
        if pickles.looks_like_pickle(b.head):
            _polyglot(b, "a safetensors file")
        return FileFormat.SAFETENSORS
    return None


def _pickle(b: _Bytes) -> FileFormat | None:
    if pickles.is_legacy(b.head):
        return FileFormat.TORCH_LEGACY
    if pickles.looks_like_pickle(b.head):
        if b.head[8:9] == b"{" and pickles.runs_as_pickle(b.f) is None:
            return None  # a damaged safetensors file (its length field starts like a PROTO)
        return FileFormat.PICKLE
    return None


def _damaged_safetensors(b: _Bytes) -> FileFormat | None:
    # A JSON object where a safetensors header starts, but a length that does not fit: the
    # header reader says exactly how it is broken (truncated, or a length past every limit).
    return FileFormat.SAFETENSORS if b.head[8:9] == b"{" else None


# The order matters only where checks could overlap; each is structural.
_SNIFFERS: tuple[Callable[[_Bytes], FileFormat | None], ...] = (
    _zip,
    _numpy,
    _safetensors,
    _pickle,
    _damaged_safetensors,
)


def sniff(path: Path, f: BinaryIO, size: int, *, limits: Limits = DEFAULT_LIMITS) -> FileFormat:
    """The format of the ``size`` bytes in ``f`` (``path`` names them in errors).

    Raises:
        CorruptFileError: a known format, but damaged in a way that shows already.
        UnsafeFileError: a file built to be read two ways (zip tricks, polyglots).
        UnknownFormatError: no format torchkeep knows.
    """
    f.seek(0)
    head = f.read(64)
    if not head:
        raise CorruptFileError(path, "the file is empty (0 bytes)")
    b = _Bytes(path, f, head, size, limits)
    for sniffer in _SNIFFERS:
        found = sniffer(b)
        if found is not None:
            f.seek(0)
            return found
    raise UnknownFormatError(path, describe_unknown(head))


def detect_format(path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS) -> FileFormat:
    """The format of the file at ``path``, from its content (the suffix is ignored).

    Args:
        path (str | PathLike): the file.
        limits (Limits): bounds for the structures read to decide (zip directory).

    Returns:
        A :class:`FileFormat` the loaders read (NumPy files are refused here).

    Raises:
        ModelFileNotFoundError, PathIsDirectoryError: the path is not a file.
        CorruptFileError: a known format, but damaged or truncated.
        UnsafeFileError: a file built to fool readers (zip tricks, polyglots).
        UnknownFormatError: not a model file.

    Example:
        >>> torchkeep.detect_format("pytorch_model.bin")
        <FileFormat.TORCH_ZIP: 'torch.save (zip)'>
    """
    p = require_file(path)
    with p.open("rb") as f:
        fmt = sniff(p, f, p.stat().st_size, limits=limits)
    if fmt not in LOADABLE:
        raise UnknownFormatError(p, f"a NumPy array file ({fmt.value}); load it with numpy.load")
    return fmt


def describe_unknown(head: bytes) -> str:
    """A guess at what a file of no model format is, for the error message."""
    signatures = {
        b"\x89PNG": "a PNG image",
        b"\xff\xd8\xff": "a JPEG image",
        b"GIF8": "a GIF image",
        b"%PDF": "a PDF document",
        b"\x1f\x8b": "a gzip archive (decompress it first)",
        b"BZh": "a bzip2 archive (decompress it first)",
        b"\xfd7zXZ": "an xz archive (decompress it first)",
        b"\x89HDF": "an HDF5 file (Keras/TensorFlow weights?)",
        b"ONNX": "an ONNX model",
        b"version https://git-lfs": "a Git LFS pointer, not the file itself (run git lfs pull)",
        b"<!DOCTYPE html": "an HTML page (a failed download?)",
        b"<html": "an HTML page (a failed download?)",
    }
    for magic, what in signatures.items():
        if head.startswith(magic):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of no known format"
    if text.lstrip().startswith(("{", "[")):
        return "a JSON text file"
    return "a text file"

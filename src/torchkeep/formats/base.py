"""What every format module shares: the :class:`FileFormat` names, tensor descriptions, path checks."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from torchkeep.errors import (
    CorruptFileError,
    ModelFileNotFoundError,
    PathIsDirectoryError,
    UnsupportedSuffixError,
)

__all__ = ["WEIGHT_SUFFIXES", "FileFormat", "TensorInfo", "require_file", "suffix_format"]


class FileFormat(str, enum.Enum):
    """The formats torchkeep tells apart (the loaders read the first five)."""

    SAFETENSORS = "safetensors"
    TORCH_ZIP = "torch.save (zip)"
    TORCH_LEGACY = "torch.save (legacy, pre-1.6)"
    TORCH_EXPORT = "torch.export (.pt2)"
    PICKLE = "pickle (not written by torch.save)"
    NUMPY = "numpy .npy"
    NUMPY_ZIP = "numpy .npz"


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

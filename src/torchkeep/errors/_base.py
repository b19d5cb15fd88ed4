"""The base of every torchkeep error, the six groups under it, and the message helpers they share."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CheckpointError",
    "DistributedError",
    "DoesNotFitError",
    "TorchkeepError",
    "UnreadableFileError",
    "UnsafeError",
    "UsageError",
    "first_line",
]


_LIST_LIMIT = 10


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _short_list(items: Sequence[str], limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", … ({len(items) - limit} more)"
    return shown


def _where(member: str | None, offset: int | None) -> str:
    parts = []
    if member is not None:
        parts.append(f"member {member!r}")
    if offset is not None:
        parts.append(f"offset {offset}")
    return f" (at {', '.join(parts)})" if parts else ""


class TorchkeepError(Exception):
    """Base class of every error raised by torchkeep.

    Example:
        >>> try:
        ...     torchkeep.load_weights("missing.pt")
        ... except torchkeep.TorchkeepError as err:
        ...     print(err)
    """


class UnreadableFileError(TorchkeepError):
    """Group: a file (or folder) could not be read as what was asked for: missing, damaged,
    of an unknown format, or holding something else.

    Example:
        >>> try:
        ...     torchkeep.load_weights(path)
        ... except torchkeep.UnreadableFileError as err:  # any reason the file cannot be used
        ...     print(err)
    """


class UnsafeError(TorchkeepError):
    """Group: a file would run code, or asks for more than the limits allow; nothing was loaded."""


class DoesNotFitError(TorchkeepError):
    """Group: the file is fine but does not fit the model or objects given (keys, shapes, parts)."""


class CheckpointError(TorchkeepError):
    """Group: a problem of a checkpoint run: none valid, a newer format, a failed background
    save, another writer holding the run, a missing metric."""


class DistributedError(TorchkeepError):
    """Group: a rank of a ``torch.distributed`` job failed; every rank raises it."""


class UsageError(TorchkeepError):
    """Group: an argument or an environment torchkeep cannot work with (a suffix, metadata,
    a value that needs pickle, a missing extra, an unknown URL protocol, an export failure)."""

"""Errors of the group :class:`UnsafeError`: loading the file would run code or exceed the limits."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

from torchkeep.errors._base import UnsafeError, _short_list, _where

__all__ = [
    "LimitExceededError",
    "UnsafeFileError",
    "UntrustedFileError",
]


class UnsafeFileError(UnsafeError, pickle.UnpicklingError):
    """Loading the file would import or call code, or it is built to fool readers.

    Attributes:
        path: the file.
        globals: the ``module.name`` objects outside the allowlist that the
            file would import.
        reason: what was refused.
        member: the zip member (e.g. ``archive/data.pkl``), if any.
        offset: the byte offset in that member (or file) where it was found.
        opcode: the pickle opcode refused, if any.
    """

    def __init__(
        self,
        path: Path,
        globals_: Sequence[str] = (),
        *,
        reason: str | None = None,
        member: str | None = None,
        offset: int | None = None,
        opcode: str | None = None,
    ) -> None:
        self.path = path
        self.globals = list(globals_)
        self.member = member
        self.offset = offset
        self.opcode = opcode
        if reason is None:
            names = _short_list(self.globals) if self.globals else "objects outside the safe allowlist"
            reason = f"is a pickle that would import {names} when loaded"
        self.reason = reason
        where = _where(member, offset)
        if opcode is not None:
            where = f"{where[:-1]}, opcode {opcode})" if where else f" (opcode {opcode})"
        if self.globals or opcode is not None:
            advice = (
                "Nothing was unpickled. If you trust where the file came from, pass trust=True; "
                "`torchkeep scan` lists everything it would import. To make a file that needs no trust, "
                "load it once with trust=True and re-save it with "
                "torchkeep.save_weights(model, 'model.safetensors') or "
                "torchkeep.save_model(model, 'model.pt2', example_inputs=...) "
                "(CLI: torchkeep convert --trust IN OUT.safetensors)."
            )
        else:
            advice = (
                "Nothing was unpickled. The file looks crafted to fool model-file scanners: do not "
                "load it with torch.load; `torchkeep scan` shows the details."
            )
        super().__init__(f"{path} {reason}{where}. {advice}")


# The name used before ``scan`` existed; the same class.
UntrustedFileError = UnsafeFileError


class LimitExceededError(UnsafeError, ValueError):
    """A file asks for more than the reading limits allow (checked before allocating).

    Attributes:
        path: the file.
        limit: the name of the :class:`~torchkeep.Limits` field.
        value: what the file asks for.
        maximum: the limit in force.

    Example:
        >>> torchkeep.load_weights("huge.pt", limits=torchkeep.Limits(max_bytes=2**41))
    """

    def __init__(self, path: Path, limit: str, value: int, maximum: int, *, what: str = "the file") -> None:
        self.path = path
        self.limit = limit
        self.value = value
        self.maximum = maximum
        super().__init__(
            f"{path}: {what} exceeds the reading limit {limit}={maximum:,} (it asks for {value:,}); "
            "nothing was allocated. If you trust the file and it really is this large, pass "
            f"limits=torchkeep.Limits({limit}={value:,}) (CLI: --raise-limit {limit}={value})."
        )

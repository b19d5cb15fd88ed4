"""What a pickle would import or call: the records of the unpickler's collect mode (``torchkeep scan``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Finding", "Placeholder"]


@dataclass(frozen=True)
class Finding:
    """Something a pickle would import or call that is not on the allowlist."""

    kind: str  # "import", "call", "opcode" or "value"
    detail: str
    member: str | None
    offset: int


@dataclass(frozen=True)
class Placeholder:
    """Stands in (in collect mode) for an object the file would have made by running code."""

    name: str

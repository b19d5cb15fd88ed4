"""Which checkpoints a run keeps: small policies that compose.

A policy looks at the run's checkpoints (oldest first) and names the ones it
keeps; a checkpoint stays if *any* policy keeps it (``KeepLast(3) | KeepBest(1,
"val_loss")``), and the one just written is never deleted. A new policy is
one class here with a ``keep`` method.

Example:
    >>> policy = KeepLast(3) | KeepBest(1, "val_loss") | KeepEveryInterval(3600)
    >>> ckpts = torchkeep.Checkpointer("runs/exp1", retention=policy)
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from torchkeep.run.reader import CheckpointEntry, rank

__all__ = ["KeepAny", "KeepBest", "KeepEvery", "KeepEveryInterval", "KeepLast", "Policy", "from_options"]


class Policy(Protocol):
    """Names the checkpoints to keep among ``entries`` (oldest first)."""

    def keep(self, entries: Sequence[CheckpointEntry]) -> set[int]:
        """The steps kept."""
        ...  # pragma: no cover

    def __or__(self, other: Policy) -> Policy: ...  # pragma: no cover


class _Composable:
    def __or__(self, other: Policy) -> Policy:
        return KeepAny((self, other))  # type: ignore[arg-type]


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class KeepAny(_Composable):
    """Keeps what any of ``policies`` keeps."""

    policies: tuple[Policy, ...]

    def keep(self, entries: Sequence[CheckpointEntry]) -> set[int]:
        return set().union(*(p.keep(entries) for p in self.policies))


@dataclass(frozen=True)
class KeepLast(_Composable):
    """The newest ``n`` valid checkpoints."""

    n: int

    def __post_init__(self) -> None:
        _positive("keep_last", self.n)

    def keep(self, entries: Sequence[CheckpointEntry]) -> set[int]:
        return {e.step for e in [e for e in entries if e.valid][-self.n :]}


@dataclass(frozen=True)
class KeepBest(_Composable):
    """The best ``n`` valid, finite checkpoints by ``monitor`` (``mode`` "min" or "max")."""

    n: int
    monitor: str
    mode: str = "min"

    def __post_init__(self) -> None:
        _positive("keep_best", self.n)
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")

    def keep(self, entries: Sequence[CheckpointEntry]) -> set[int]:
        return {e.step for e in rank(entries, self.monitor, self.mode)[: self.n]}


@dataclass(frozen=True)
class KeepEvery(_Composable):
    """Every checkpoint whose step is a multiple of ``steps``."""

    steps: int

    def __post_init__(self) -> None:
        _positive("keep_every", self.steps)

    def keep(self, entries: Sequence[CheckpointEntry]) -> set[int]:
        return {e.step for e in entries if e.step % self.steps == 0}


def _created(entry: CheckpointEntry) -> float | None:
    if not entry.created:
        return None
    try:
        return float(calendar.timegm(time.strptime(entry.created, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


@dataclass(frozen=True)
class KeepEveryInterval(_Composable):
    """One checkpoint per ``seconds`` of wall time (the first of each window), as Orbax's
    ``keep_time_interval`` does."""

    seconds: float

    def __post_init__(self) -> None:
        if not isinstance(self.seconds, (int, float)) or self.seconds <= 0:
            raise ValueError(f"seconds must be positive, got {self.seconds!r}")

    def keep(self, entries: Sequence[CheckpointEntry]) -> set[int]:
        kept: set[int] = set()
        last: float | None = None
        for entry in entries:
            when = _created(entry)
            if entry.valid and when is not None and (last is None or when - last >= self.seconds):
                kept.add(entry.step)
                last = when
        return kept


def from_options(
    *, keep_last: int | None, keep_best: int | None, keep_every: int | None, monitor: str | None, mode: str
) -> Policy | None:
    """The policy that ``Checkpointer``'s ``keep_*`` arguments describe (``None``: keep everything).

    The best checkpoint by ``monitor`` is always kept once anything is pruned.
    """
    for name, value in (("keep_last", keep_last), ("keep_best", keep_best), ("keep_every", keep_every)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    parts: list[Policy] = []
    if keep_last is not None:
        parts.append(KeepLast(keep_last))
    if keep_every is not None:
        parts.append(KeepEvery(keep_every))
    if keep_best is not None and monitor is None:
        raise ValueError("keep_best needs monitor='<metric name>' to rank checkpoints")
    if not parts and keep_best is None:
        return None
    if monitor is not None:
        parts.append(KeepBest(keep_best or 1, monitor, mode))
    return parts[0] if len(parts) == 1 else KeepAny(tuple(parts))

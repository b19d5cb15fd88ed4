"""Errors of the group :class:`CheckpointError`: a checkpoint run's problem."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torchkeep.errors._base import CheckpointError, first_line

__all__ = [
    "AsyncSaveError",
    "MissingMetricError",
    "NewerFormatError",
    "NoValidCheckpointError",
    "RunLockedError",
]


class NoValidCheckpointError(CheckpointError, FileNotFoundError):
    """A run folder holds checkpoints, but none of them verifies.

    Attributes:
        directory: the run folder.
        reasons: ``{checkpoint folder name: why it is invalid}``.
    """

    def __init__(self, directory: Path | str, reasons: dict[str, str]) -> None:
        self.directory = directory
        self.reasons = dict(reasons)
        listed = "; ".join(f"{name}: {why}" for name, why in list(self.reasons.items())[:5])
        super().__init__(
            f"{directory} holds {len(self.reasons)} checkpoint(s) and none is valid ({listed}). "
            "Nothing was restored or changed. Restore the folder from a backup, or move it away to "
            "start the run from scratch; `torchkeep verify` shows each problem."
        )


class NewerFormatError(CheckpointError, ValueError):
    """A checkpoint was written by a newer torchkeep, in a format this version does not know.

    Attributes:
        path: the checkpoint.
        found: its format version.
        supported: the newest version this torchkeep reads.
    """

    def __init__(self, path: Path, found: object, supported: int) -> None:
        self.path = path
        self.found = found
        self.supported = supported
        super().__init__(
            f"{path} uses checkpoint format version {found}, but this torchkeep reads versions up to "
            f"{supported}; upgrade torchkeep (pip install -U torchkeep) to restore it. Nothing was changed."
        )


class AsyncSaveError(CheckpointError, RuntimeError):
    """A checkpoint written in the background (``async_save=True``) failed.

    Raised by the next call on the :class:`~torchkeep.Checkpointer` (``save``,
    ``wait``, ``restore``, leaving its ``with`` block), so no failure is lost.
    The failed checkpoint was not committed; earlier ones are intact.

    Attributes:
        step: the step whose save failed.
        cause: the original exception (also ``__cause__``).
    """

    def __init__(self, step: int, cause: BaseException) -> None:
        self.step = step
        self.cause = cause
        super().__init__(
            f"the background save of step {step} failed: {first_line(cause)}. That checkpoint was not "
            "committed and the earlier ones are intact; fix the cause (disk space? permissions?) and "
            "save again."
        )


class RunLockedError(CheckpointError, BlockingIOError):
    """Another writer holds the run folder: one Checkpointer writes to a run at a time.

    Attributes:
        directory: the run folder (or its URL).
        holder: what the holder recorded about itself (``host``, ``pid``, ``since``).

    Example:
        >>> torchkeep.Checkpointer("runs/exp1")   # while a training process saves there
        RunLockedError: runs/exp1 is being written by pid 4242 on host gpu-7 ...
    """

    def __init__(self, directory: Path | str, holder: dict[str, object]) -> None:
        self.directory = directory
        self.holder = dict(holder)
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        super().__init__(
            f"{directory} is being written by {who} (since {holder.get('since', '?')}); a run has one "
            "writer at a time. Stop that process, or read the run without writing: "
            "Checkpointer(..., read_only=True) or `torchkeep ls`."
        )


class MissingMetricError(CheckpointError, KeyError):
    """The metric to monitor is not among the metrics given.

    Attributes:
        monitor: the metric's name.
        available: the names that were given.
    """

    def __init__(self, monitor: str, available: Sequence[str], *, where: str) -> None:
        self.monitor = monitor
        self.available = list(available)
        super().__init__(
            f"{where} monitors {monitor!r}, but the metrics given are {self.available or 'empty'}; "
            f"pass metrics={{{monitor!r}: value}} or monitor one of the given names"
        )

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])

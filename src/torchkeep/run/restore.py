"""Restoring a run: choose the checkpoint (rank 0, newest that verifies), then apply it everywhere.

Rank 0 verifies and applies from the same local copy (a remote checkpoint is
downloaded once) and tells the other ranks which checkpoint it chose, or why
there is none; every rank then applies it (:func:`~torchkeep.run.snapshot.apply_checkpoint`).
Nothing in storage is changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

from torchkeep.checkpoint import CheckpointInfo
from torchkeep.distributed import Coordinator
from torchkeep.errors import NewerFormatError, NoValidCheckpointError, TorchkeepError
from torchkeep.run.layout import FORMAT_VERSION, step_name
from torchkeep.run.reader import RunReader, check_version, verify_step
from torchkeep.run.snapshot import apply_checkpoint

__all__ = ["restore_run"]

logger = logging.getLogger(__name__)


def _check(reader: RunReader, folder: Path, name: str, skipped: dict[str, str]) -> str | int:
    """``"ok"``, ``"skip"`` (the reason goes to ``skipped``) or the newer format version found."""
    verdict = verify_step(folder)
    reason = verdict.reason
    if verdict.ok:
        version, reason = check_version(verdict.manifest)
        if not reason:
            return "ok"
        if version is not None and version > FORMAT_VERSION:
            return version
    skipped[name] = reason
    logger.warning("skipping checkpoint %s: %s", reader.store.public(name), reason)
    return "skip"


def restore_run(
    reader: RunReader,
    coordinator: Coordinator,
    given: dict[str, Any],
    options: dict[str, Any],
    *,
    path: str | None,
) -> CheckpointInfo | None:
    """Restore checkpoint ``path`` (a folder of this run) or the newest that verifies (collective).

    Raises:
        NoValidCheckpointError: checkpoints exist but none verifies.
        NewerFormatError: the newest checkpoint was written by a newer torchkeep.
        CheckpointMismatchError, KeyMismatchError: it does not fit the objects given.
    """
    store = reader.store

    def apply(folder: Path, name: str) -> CheckpointInfo:
        info = apply_checkpoint(folder, given, coordinator=coordinator, **options)
        return dataclasses.replace(info, path=store.public(name))

    if path is not None:
        candidates = [reader.name_of(path)]
    else:
        candidates = [step_name(step) for step in reversed(reader.steps())]
    if coordinator.is_main:
        skipped: dict[str, str] = {}
        for name in candidates:
            with contextlib.ExitStack() as stack:
                try:  # a download that fails, or a folder pruned meanwhile: the next candidate
                    folder = stack.enter_context(reader.open(name))
                    verdict = _check(reader, folder, name, skipped)
                except (OSError, ValueError, TorchkeepError) as err:
                    skipped[name] = f"cannot be read ({err})"
                    logger.warning("skipping checkpoint %s: %s", store.public(name), skipped[name])
                    continue
                if verdict == "ok":
                    coordinator.share(("ok", name))
                    return apply(folder, name)
                if isinstance(verdict, int):
                    coordinator.share(("newer", verdict))
                    raise NewerFormatError(Path(str(store.public(name))), verdict, FORMAT_VERSION)
        choice: tuple[str, Any] = ("invalid", skipped) if candidates else ("none", None)
        coordinator.share(choice)
    else:
        choice = coordinator.share(None)
        kind, detail = choice
        if kind == "ok":
            with reader.open(detail) as folder:
                return apply(folder, detail)
        if kind == "newer":
            raise NewerFormatError(Path(str(reader.directory)), detail, FORMAT_VERSION)
    kind, detail = choice
    if kind == "invalid":
        raise NoValidCheckpointError(reader.directory, detail)
    return None

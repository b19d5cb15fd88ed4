"""Checkpointer: a run folder of checkpoints that writes atomically, verifies, prunes and resumes.

Layout of a run folder::

    runs/exp1/
      step-00000120/            one committed checkpoint
        tensors.safetensors     every tensor: model, optimizer state, RNG, …
        state.json              everything else, pointing into the tensors
        manifest.json           written last: size and XXH3-128 digest of each file
      .step-00000130.tmp-…/     a save in progress (or killed): never read, cleaned up

A checkpoint folder only gets its ``step-…`` name by an atomic rename after
all its files are written and fsynced, so a crash leaves either the complete
new checkpoint or none. Readers verify the manifest and fall back to the
newest checkpoint that verifies.
"""

from __future__ import annotations

import builtins
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkeep.checkpoint import CheckpointInfo, Stateful, apply_states
from torchkeep.errors import (
    AsyncSaveError,
    CheckpointMismatchError,
    MissingMetricError,
    NewerFormatError,
    NoValidCheckpointError,
)
from torchkeep.rng import capture_rng_state, restore_rng_state
from torchkeep.serialize import flatten, unflatten
from torchkeep.storage.atomic import discard, fsync_dir
from torchkeep.storage.manifest import DIGEST, MANIFEST, file_record, verify_folder, write_json
from torchkeep.storage.staging import StagingBuffers
from torchkeep.storage.tensorfile import write_safetensors
from torchkeep.weights import MapLocation, compact_tensors, to_state_dict

__all__ = ["FORMAT_VERSION", "CheckpointEntry", "Checkpointer", "metric_value"]

logger = logging.getLogger(__name__)

FORMAT = "torchkeep.checkpoint"
FORMAT_VERSION = 1
TENSORS = "tensors.safetensors"
STATE = "state.json"
_NAME = re.compile(r"^step-(\d{8,})$")
_STATE_KEYS = {"step", "epoch", "metrics", "extra", "model", "aliases", "parts", "rng", "versions"}
_RESERVED = {"model", "optimizer", "scheduler", "scaler"}


def metric_value(value: Any) -> float | None:
    """A metric as a float (tensors and NumPy scalars too); ``None`` for NaN or non-numbers."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item() if value.numel() == 1 else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint folder of a run, as :meth:`Checkpointer.list` sees it.

    Attributes:
        path: the folder.
        step: its step.
        epoch: its epoch, if saved.
        created: when it was committed (ISO 8601, UTC).
        size: bytes on disk.
        metrics: the metrics saved with it.
        valid: whether it verified.
        reason: why not, when it did not.
    """

    path: Path
    step: int
    epoch: int | None = None
    created: str | None = None
    size: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    valid: bool = True
    reason: str = ""


def _log_failure(future: Future[Path]) -> None:
    # Logged where it happens too, in case the program ends before the next call raises it.
    error = future.exception()
    if error is not None:
        logger.error("background checkpoint save failed: %s", error)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Checkpointer:
    """Save, prune and restore the checkpoints of one training run.

    Args:
        directory (str | PathLike): the run folder (created if missing).
        keep_last (int | None, default None): keep the newest N checkpoints.
        keep_best (int | None, default None): keep the best K by ``monitor``.
        monitor (str | None, default None): the metric that ranks checkpoints;
            a checkpoint without it is never "best".
        mode (str, default "min"): ``"min"`` or ``"max"``: which way is better.
        keep_every (int | None, default None): also keep every checkpoint whose
            step is a multiple of this.
        durable (bool, default True): fsync files and folders on save, so a
            committed checkpoint also survives a power loss.
        async_save (bool, default False): ``save()`` returns once every tensor
            is copied into host staging buffers (reused from save to save,
            pinned for GPU tensors); a background thread writes, checksums,
            fsyncs, commits and prunes. One save is in flight at most (the
            next ``save()`` waits for it); ``wait()`` or leaving a ``with``
            block flushes; a background failure is raised by the next call as
            :class:`AsyncSaveError`. Staging costs host memory equal to the
            state's size.

    With no ``keep_*`` option every checkpoint is kept. The options compose:
    a checkpoint stays if any of them keeps it, and the one just written and
    the current best are never deleted.

    Example:
        >>> ckpts = torchkeep.Checkpointer("runs/exp1", keep_last=3, keep_best=1, monitor="val_loss")
        >>> info = ckpts.restore(model=model, optimizer=opt, scheduler=sched)
        >>> start = info.step + 1 if info else 0
        >>> for step in range(start, total):
        ...     ...
        ...     ckpts.save(step, model=model, optimizer=opt, scheduler=sched, metrics={"val_loss": v})
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
        keep_every: int | None = None,
        durable: bool = True,
        async_save: bool = False,
    ) -> None:
        for name, value in (("keep_last", keep_last), ("keep_best", keep_best), ("keep_every", keep_every)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if keep_best is not None and monitor is None:
            raise ValueError("keep_best needs monitor='<metric name>' to rank checkpoints")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.monitor = monitor
        self.mode = mode
        self.keep_every = keep_every
        self.durable = durable
        self.async_save = async_save
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Future[Path]] | None = None
        self._staging = StagingBuffers()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()

    # -- background saves --------------------------------------------------------------------------

    def wait(self) -> Path | None:
        """Block until the save in flight (``async_save=True``) is committed; return its folder.

        Returns:
            The folder committed by the background save, or ``None`` when none was in flight.

        Raises:
            AsyncSaveError: the background save failed (nothing of it was committed).
        """
        if self._pending is None:
            return None
        step, future = self._pending
        self._pending = None
        try:
            return future.result()
        except Exception as err:
            raise AsyncSaveError(step, err) from err

    def close(self) -> None:
        """Flush the save in flight and stop the background thread (``with`` does this)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        if kind is None:
            self.close()
            return
        try:  # do not hide the error that ends the block; a failed save is still logged
            self.close()
        except AsyncSaveError as failed:
            logger.error("%s", failed)

    # -- listing -----------------------------------------------------------------------------------

    def _folders(self) -> builtins.list[tuple[int, Path]]:
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def _entry(self, step: int, path: Path, *, checksums: bool) -> CheckpointEntry:
        verdict = verify_folder(path, checksums=checksums)
        manifest = verdict.manifest or {}
        metrics = manifest.get("metrics")
        return CheckpointEntry(
            path=path,
            step=step,
            epoch=manifest.get("epoch"),
            created=manifest.get("created"),
            size=_folder_size(path),
            metrics=dict(metrics) if isinstance(metrics, dict) else {},
            valid=verdict.ok,
            reason=verdict.reason,
        )

    def list(self, *, verify: bool = False) -> builtins.list[CheckpointEntry]:
        """Every checkpoint folder, oldest first.

        Args:
            verify (bool, default False): check the digests too (reads
                every file); without it, only that each file has its size.
        """
        self.wait()
        return self._entries(verify=verify)

    def _entries(self, *, verify: bool = False) -> builtins.list[CheckpointEntry]:
        return [self._entry(step, path, checksums=verify) for step, path in self._folders()]

    @property
    def latest(self) -> Path | None:
        """The newest checkpoint folder whose files are all there (sizes checked)."""
        for entry in reversed(self.list()):
            if entry.valid:
                return entry.path
        return None

    @property
    def best(self) -> Path | None:
        """The best checkpoint folder by ``monitor`` (``None`` without a monitor or a scored one)."""
        ranked = self._ranked([e for e in self.list() if e.valid])
        return ranked[0].path if ranked else None

    def _ranked(self, entries: builtins.list[CheckpointEntry]) -> builtins.list[CheckpointEntry]:
        if self.monitor is None:
            return []
        scored = [(metric_value(e.metrics.get(self.monitor)), e) for e in entries]
        usable = [(v, e) for v, e in scored if v is not None]
        sign = 1.0 if self.mode == "min" else -1.0
        usable.sort(key=lambda ve: (sign * ve[0], -ve[1].step))  # ties: the newer one
        return [e for _, e in usable]

    # -- saving ------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: Stateful | None = None,
        scheduler: Stateful | None = None,
        scaler: Stateful | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        **stateful: Stateful,
    ) -> Path:
        """Write a checkpoint for ``step``, atomically, then prune by the ``keep_*`` rules.

        Args:
            step (int): the training step (or epoch) this checkpoint is for;
                saving the same step again replaces that checkpoint.
            model (nn.Module): the model.
            optimizer, scheduler, scaler (Stateful | None, default None): saved when given.
            epoch (int | None, default None): the epoch, for your records.
            metrics (Mapping[str, Any] | None, default None): numbers; the
                ``monitor`` metric ranks checkpoints.
            extra (Mapping[str, Any] | None, default None): any plain values of yours.
            **stateful (Stateful): more objects with ``state_dict()`` /
                ``load_state_dict()`` (a data sampler, an EarlyStopping, …),
                restored by the same keyword.

        Returns:
            The committed checkpoint folder (with ``async_save``, the folder it
            will be once the background write commits it; ``wait()`` for that).

        Raises:
            UnserializableValueError: a value that cannot be stored without pickle.
            AsyncSaveError: the previous background save failed.
        """
        self.wait()
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        clash = _RESERVED & set(stateful)
        if clash:
            raise ValueError(f"{sorted(clash)} are named parameters of save(), not extra stateful objects")
        clean_metrics = {str(k): metric_value(v) for k, v in (metrics or {}).items()}
        if self.monitor is not None and metrics is not None and self.monitor not in clean_metrics:
            raise MissingMetricError(self.monitor, list(clean_metrics), where="this Checkpointer")
        tensors: dict[str, torch.Tensor] = {}
        model_state = to_state_dict(model)
        for key, value in model_state.items():
            tensors[f"model/{key}"] = value
        parts = {
            name: flatten(obj.state_dict(), name, tensors)
            for name, obj in {
                "optimizer": optimizer,
                "scheduler": scheduler,
                "scaler": scaler,
                **stateful,
            }.items()
            if obj is not None
        }
        state = {
            "step": step,
            "epoch": epoch,
            "metrics": clean_metrics,
            "extra": flatten(dict(extra or {}), "extra", tensors),
            "model": list(model_state),
            "parts": parts,
            "rng": flatten(capture_rng_state(), "rng", tensors),
            "versions": {"torch": str(torch.__version__), "format": FORMAT_VERSION},
        }
        if not self.async_save:
            kept, aliases = compact_tensors(tensors, None)
            state["aliases"] = aliases
            return self._write(step, kept, state, epoch, clean_metrics)
        kept, aliases = compact_tensors(tensors, None, stage=self._staging.copy)
        self._staging.settle(set(kept))
        state["aliases"] = aliases
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchkeep-save")
        future = self._executor.submit(self._write, step, kept, state, epoch, clean_metrics)
        future.add_done_callback(_log_failure)
        self._pending = (step, future)
        return self.directory / f"step-{step:08d}"

    def _write(
        self,
        step: int,
        tensors: dict[str, torch.Tensor],
        state: dict[str, Any],
        epoch: int | None,
        metrics: dict[str, float | None],
    ) -> Path:
        folder = self._commit(step, tensors, state, epoch=epoch, metrics=metrics)
        logger.info("saved checkpoint %s", folder)
        self._prune(just_written=folder)
        return folder

    def _commit(
        self,
        step: int,
        tensors: dict[str, torch.Tensor],
        state: dict[str, Any],
        *,
        epoch: int | None,
        metrics: dict[str, float | None],
    ) -> Path:
        name = f"step-{step:08d}"
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            # one pass: the digest is computed from memory while the file is written and fsynced
            fd = os.open(tmp / TENSORS, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                written = write_safetensors(fd, tensors, {"format": "pt"}, digest=DIGEST, fsync=self.durable)
            finally:
                os.close(fd)
            write_json(tmp / STATE, state, durable=self.durable)
            record = file_record(tmp / STATE)
            files = {
                TENSORS: {"size": written.size, DIGEST: written.digest},
                STATE: record.entry(),
            }
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "step": step,
                "epoch": epoch,
                "metrics": metrics,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": files,
            }
            write_json(tmp / MANIFEST, manifest, durable=self.durable)
            if self.durable:
                fsync_dir(tmp)
            if final.exists():
                # replace: move the old one aside first; a crash in between is undone by _clean_leftovers
                old = self.directory / f".{name}.old-{secrets.token_hex(4)}"
                os.rename(final, old)
                os.rename(tmp, final)
                _remove_tree(old)
            else:
                os.rename(tmp, final)
        except BaseException:
            _remove_tree(tmp)
            raise
        if self.durable:
            fsync_dir(self.directory)
        return final

    # -- retention ---------------------------------------------------------------------------------

    def _prune(self, *, just_written: Path) -> None:
        if self.keep_last is None and self.keep_best is None and self.keep_every is None:
            return
        entries = self._entries()  # from disk, so pruning after a resume sees every checkpoint
        keep = {just_written}
        valid = [e for e in entries if e.valid]
        if self.keep_last is not None:
            keep.update(e.path for e in valid[-self.keep_last :])
        if self.keep_every is not None:
            keep.update(e.path for e in entries if e.step % self.keep_every == 0)
        ranked = self._ranked(valid)
        keep.update(e.path for e in ranked[: self.keep_best or 1])
        for entry in entries:
            if entry.path not in keep:
                trash = self.directory / f".trash-{entry.path.name}-{secrets.token_hex(4)}"
                os.rename(entry.path, trash)  # vanishes at once; the space is freed in the background
                discard(trash)
                if entry.valid:
                    logger.info("pruned %s", entry.path.name)
                else:
                    logger.warning("deleted invalid checkpoint %s (%s)", entry.path.name, entry.reason)

    def _clean_leftovers(self) -> None:
        for path in self.directory.iterdir():
            name = path.name
            if name.startswith(".step-") and ".old-" in name:
                original = self.directory / name[1:].split(".old-")[0]
                if not original.exists():  # killed between the two renames of a replace: put it back
                    os.rename(path, original)
                    logger.warning("recovered %s from an interrupted replace", original.name)
                    continue
            if name.startswith((".step-", ".trash-")) and path.is_dir():
                _remove_tree(path)
                logger.info("removed %s left by an interrupted save", name)

    # -- restoring ---------------------------------------------------------------------------------

    def restore(
        self,
        *,
        model: nn.Module | None = None,
        optimizer: Stateful | None = None,
        scheduler: Stateful | None = None,
        scaler: Stateful | None = None,
        restore_rng: bool = True,
        strict: bool = True,
        map_location: MapLocation = "cpu",
        path: str | os.PathLike[str] | None = None,
        **stateful: Stateful,
    ) -> CheckpointInfo | None:
        """Restore the newest checkpoint that verifies; ``None`` on a fresh run.

        Newer checkpoints that fail verification are skipped with a logged
        warning that says why. Every check runs before the first object is
        changed, and nothing on disk is modified.

        Args:
            model (nn.Module | None, default None): receives the weights.
            optimizer, scheduler, scaler (Stateful | None, default None): receive their states.
            restore_rng (bool, default True): restore Python, NumPy, torch and
                CUDA random states (a warning names any that cannot be).
            strict (bool, default True): passed to :func:`load_into`.
            map_location (str | torch.device, default "cpu"): where tensors are read to.
            path (str | PathLike | None, default None): restore this checkpoint
                folder (e.g. ``ckpts.best``) instead of the newest.
            **stateful (Stateful): objects saved under the same keywords.

        Returns:
            A :class:`CheckpointInfo`, or ``None`` when the run folder holds no checkpoint.

        Raises:
            NoValidCheckpointError: checkpoints exist but none verifies.
            NewerFormatError: the newest checkpoint was written by a newer torchkeep.
            CheckpointMismatchError, KeyMismatchError: it does not fit the objects given.
            AsyncSaveError: a background save failed.
        """
        self.wait()
        candidates = [Path(path)] if path is not None else [p for _, p in reversed(self._folders())]
        if not candidates:
            return None
        skipped: dict[str, str] = {}
        for folder in candidates:
            verdict = verify_folder(folder)
            if not verdict.ok:
                skipped[folder.name] = verdict.reason
                logger.warning("skipping checkpoint %s: %s", folder, verdict.reason)
                continue
            manifest = verdict.manifest or {}
            version = manifest.get("format_version")
            if manifest.get("format") != FORMAT or not isinstance(version, int):
                skipped[folder.name] = "manifest.json is not a torchkeep checkpoint manifest"
                logger.warning("skipping checkpoint %s: %s", folder, skipped[folder.name])
                continue
            if version > FORMAT_VERSION:
                raise NewerFormatError(folder, version, FORMAT_VERSION)
            given = {
                "model": model,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "scaler": scaler,
                **stateful,
            }
            return self._apply(
                folder, given, restore_rng=restore_rng, strict=strict, map_location=map_location
            )
        raise NoValidCheckpointError(self.directory, skipped)

    def _apply(
        self,
        folder: Path,
        given: dict[str, Any],
        *,
        restore_rng: bool,
        strict: bool,
        map_location: MapLocation,
    ) -> CheckpointInfo:
        from safetensors.torch import load_file

        with (folder / STATE).open(encoding="utf-8") as f:
            state = json.load(f)
        unknown = set(state) - _STATE_KEYS
        if unknown:
            raise CheckpointMismatchError(
                folder,
                "checkpoint",
                f"state.json holds entries this torchkeep does not know: {sorted(unknown)}",
                "upgrade torchkeep (pip install -U torchkeep), which wrote this checkpoint",
            )
        tensors = load_file(str(folder / TENSORS), device=str(torch.device(map_location)))
        for alias, canonical in state["aliases"].items():
            tensors[alias] = tensors[canonical]
        parts: dict[str, Any] = {"model": {key: tensors[f"model/{key}"] for key in state["model"]}}
        parts.update({name: unflatten(data, tensors) for name, data in state["parts"].items()})
        requested = {name: obj for name, obj in given.items() if obj is not None}
        restored, report = apply_states(folder, parts, requested, strict=strict, available=sorted(parts))
        if restore_rng:
            restore_rng_state(unflatten(state["rng"], tensors))
            restored.append("rng")
        info = CheckpointInfo(
            path=folder,
            epoch=state.get("epoch"),
            step=state.get("step"),
            loss=state["metrics"].get("loss"),
            metrics=dict(state["metrics"]),
            extra=unflatten(state["extra"], tensors),
            restored=tuple(restored),
            layout="torchkeep",
            model_report=report,
        )
        logger.info("restored %s from %s", ", ".join(restored), folder)
        return info

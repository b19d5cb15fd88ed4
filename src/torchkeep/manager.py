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
newest checkpoint that verifies. On a remote run folder (an fsspec URL) the
manifest, uploaded last, is the commit (see :mod:`torchkeep.storage.runstore`).

In a ``torch.distributed`` job every rank calls the same methods: rank 0
writes replicated state, DTensor-sharded state goes through DCP into a
``shards/`` folder written by every rank, every rank's random state is kept,
and a checkpoint is committed only after every rank reported success (see
:mod:`torchkeep.distributed`).
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from torchkeep.checkpoint import CheckpointInfo, Stateful
from torchkeep.distributed import SHARDS, Coordinator, save_shards, shard_files
from torchkeep.errors import (
    AsyncSaveError,
    MissingMetricError,
    NewerFormatError,
    NoValidCheckpointError,
)
from torchkeep.runstate import (
    FORMAT_VERSION,
    STATE,
    TENSORS,
    Snapshot,
    apply_checkpoint,
    capture,
    metric_value,
)
from torchkeep.storage.manifest import DIGEST, MANIFEST, file_record, verify_folder, write_json
from torchkeep.storage.remote import Remote, StorageOptions, resolve
from torchkeep.storage.runstore import LocalRun, Location, RemoteRun, remove_tree, step_name
from torchkeep.storage.staging import StagingBuffers
from torchkeep.storage.tensorfile import write_safetensors
from torchkeep.weights import MapLocation

__all__ = ["FORMAT_VERSION", "CheckpointEntry", "Checkpointer", "metric_value"]

logger = logging.getLogger(__name__)

FORMAT = "torchkeep.checkpoint"
_RESERVED = {"model", "optimizer", "scheduler", "scaler"}


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint folder of a run, as :meth:`Checkpointer.list` sees it.

    Attributes:
        path: the folder (a URL string for a remote run).
        step: its step.
        epoch: its epoch, if saved.
        created: when it was committed (ISO 8601, UTC).
        size: bytes stored.
        metrics: the metrics saved with it.
        valid: whether it verified.
        reason: why not, when it did not.
    """

    path: Path | str
    step: int
    epoch: int | None = None
    created: str | None = None
    size: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    valid: bool = True
    reason: str = ""

    @property
    def name(self) -> str:
        """The folder's name, e.g. ``step-00000120``."""
        return step_name(self.step)


def _log_failure(future: Future[Path | str]) -> None:
    # Logged where it happens too, in case the program ends before the next call raises it.
    error = future.exception()
    if error is not None:
        logger.error("background checkpoint save failed: %s", error)


def _public(where: Location) -> Path | str:
    return where.url if isinstance(where, Remote) else where


class Checkpointer:
    """Save, prune and restore the checkpoints of one training run.

    Args:
        directory (str | PathLike): the run folder (created if missing), or
            an fsspec URL (``s3://bucket/run``, ``gs://…``, ``memory://…``;
            ``file://`` URLs are local folders). On an object store the
            manifest is uploaded last and is the commit.
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
        storage_options (Mapping | None, default None): options of the fsspec
            filesystem of a URL (credentials, ``endpoint_url``, …).
        distributed (bool | None, default None): None: coordinate with the
            other ranks when ``torch.distributed`` is initialized (every rank
            must then construct the Checkpointer and call ``save``/``restore``).
            False: act as if this process were alone, for code that saves from
            rank 0 only (``if rank == 0: ckpts.save(...)``); only this rank's
            random state is kept and sharded (DTensor) state cannot be saved.

    With no ``keep_*`` option every checkpoint is kept. The options compose:
    a checkpoint stays if any of them keeps it, and the one just written and
    the current best are never deleted.

    In a ``torch.distributed`` job, construct it and call ``save``/``restore``
    on every rank (they are collective). Rank 0 writes replicated (DDP) state
    and commits; DTensor-sharded state (FSDP2, tensor parallel) is written by
    every rank through ``torch.distributed.checkpoint`` and restores on any
    number of ranks; each rank's random state is kept. A failure on any rank
    raises :class:`DistributedSaveError` on all of them and commits nothing.

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
        storage_options: StorageOptions | None = None,
        distributed: bool | None = None,
    ) -> None:
        for name, value in (("keep_last", keep_last), ("keep_best", keep_best), ("keep_every", keep_every)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if keep_best is not None and monitor is None:
            raise ValueError("keep_best needs monitor='<metric name>' to rank checkpoints")
        location = resolve(directory, storage_options)
        self._store = RemoteRun(location) if isinstance(location, Remote) else LocalRun(location)
        self.directory: Path | str = _public(location)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.monitor = monitor
        self.mode = mode
        self.keep_every = keep_every
        self.durable = durable
        self.async_save = async_save
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Future[Path | str]] | None = None
        self._staging = StagingBuffers()
        self._coordinator = Coordinator(enabled=distributed)
        if self._coordinator.is_main:
            self._store.clean_leftovers()

    # -- background saves --------------------------------------------------------------------------

    def wait(self) -> Path | str | None:
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

    def _entry(self, step: int, where: Location, *, checksums: bool) -> CheckpointEntry:
        verdict, size = self._store.inspect(where, checksums=checksums)
        manifest = verdict.manifest or {}
        metrics = manifest.get("metrics")
        return CheckpointEntry(
            path=_public(where),
            step=step,
            epoch=manifest.get("epoch"),
            created=manifest.get("created"),
            size=size,
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
        return [self._entry(step, where, checksums=verify) for step, where in self._store.steps()]

    @property
    def latest(self) -> Path | str | None:
        """The newest checkpoint folder whose files are all there (sizes checked)."""
        for entry in reversed(self.list()):
            if entry.valid:
                return entry.path
        return None

    @property
    def best(self) -> Path | str | None:
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
    ) -> Path | str:
        """Write a checkpoint for ``step``, atomically, then prune by the ``keep_*`` rules.

        Args:
            step (int): the training step (or epoch) this checkpoint is for;
                saving the same step again replaces that checkpoint.
            model (nn.Module): the model (a DDP wrapper is saved as the module inside).
            optimizer, scheduler, scaler (Stateful | None, default None): saved when given.
            epoch (int | None, default None): the epoch, for your records.
            metrics (Mapping[str, Any] | None, default None): numbers; the
                ``monitor`` metric ranks checkpoints.
            extra (Mapping[str, Any] | None, default None): any plain values of yours.
            **stateful (Stateful): more objects with ``state_dict()`` /
                ``load_state_dict()`` (a data sampler, an EarlyStopping, …),
                restored by the same keyword.

        Returns:
            The committed checkpoint folder (a URL for a remote run; with
            ``async_save``, the folder it will be once the background write
            commits it; ``wait()`` for that).

        Raises:
            UnserializableValueError: a value that cannot be stored without pickle.
            AsyncSaveError: the previous background save failed.
            DistributedSaveError: a rank of a distributed job failed (on every rank).
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
        objects = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, **stateful}
        snapshot = capture(
            step,
            model=model,
            objects=objects,
            epoch=epoch,
            metrics=clean_metrics,
            extra=extra,
            coordinator=self._coordinator,
            stage=self._staging.copy if self.async_save else None,
        )
        if not self.async_save:
            return self._write(snapshot)
        self._staging.settle(set(snapshot.tensors) | set(snapshot.shards or ()))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchkeep-save")
        future = self._executor.submit(self._write, snapshot)
        future.add_done_callback(_log_failure)
        self._pending = (step, future)
        return self._location(step_name(step))

    def _location(self, name: str) -> Path | str:
        store = self._store
        return store.root.join(name).url if isinstance(store, RemoteRun) else store.directory / name

    def _write(self, snapshot: Snapshot) -> Path | str:
        folder = self._commit(snapshot.step, snapshot)
        logger.info("saved checkpoint %s", folder)
        if self._coordinator.is_main:
            self._prune(just_written=folder)
        return folder

    def _commit(self, step: int, snapshot: Snapshot) -> Path | str:
        """Write every rank's files, then (rank 0) the manifest, and publish; collective."""
        coordinator, store, name = self._coordinator, self._store, step_name(step)

        def prepare() -> Path | None:
            if coordinator.is_main:
                return store.begin(name)
            return None if store.shared else store.scratch()

        tmp = coordinator.attempt(prepare, step=step, stage="prepare")
        if store.shared:
            tmp = coordinator.share(tmp)
        assert tmp is not None
        folder = tmp

        def commit(everything: builtins.list[dict[str, Any]]) -> Path | str | None:
            if not coordinator.is_main:
                return None
            files = {k: v for part in everything for k, v in part.items()}
            return _public(self._finish(folder, name, snapshot, files))

        try:
            records = coordinator.attempt(
                lambda: self._write_files(folder, name, snapshot), step=step, stage="write"
            )
            everything = coordinator.gather(records)
            final = coordinator.attempt(lambda: commit(everything), step=step, stage="commit")
        except BaseException:
            if coordinator.is_main:
                store.abandon(tmp, name)
            elif not store.shared:
                remove_tree(tmp)  # this rank's scratch copy
            raise
        if not coordinator.is_main and not store.shared:
            remove_tree(tmp)
        return final if final is not None else self._location(name)

    def _write_files(self, tmp: Path, name: str, snapshot: Snapshot) -> dict[str, dict[str, Any]]:
        """This rank's files in ``tmp``: DCP shards (every rank), tensors and state (rank 0)."""
        coordinator = self._coordinator
        records: dict[str, dict[str, Any]] = {}
        if snapshot.shards is not None:
            shards = tmp / SHARDS
            save_shards(snapshot.shards, shards, coordinator)
            mine = shard_files(shards, coordinator.rank)
            records = {p.relative_to(tmp).as_posix(): file_record(p).entry() for p in mine}
            if not coordinator.is_main:
                self._store.upload_part(tmp, name, mine)
        if coordinator.is_main:
            # one pass: the digest is computed from memory while the file is written and fsynced
            fd = os.open(tmp / TENSORS, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                written = write_safetensors(
                    fd, snapshot.tensors, {"format": "pt"}, digest=DIGEST, fsync=self.durable
                )
            finally:
                os.close(fd)
            write_json(tmp / STATE, snapshot.state, durable=self.durable)
            records[TENSORS] = {"size": written.size, DIGEST: written.digest}
            records[STATE] = file_record(tmp / STATE).entry()
        return records

    def _finish(self, tmp: Path, name: str, snapshot: Snapshot, files: dict[str, Any]) -> Location:
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": snapshot.step,
            "epoch": snapshot.epoch,
            "metrics": snapshot.metrics,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "world_size": self._coordinator.size,
            "files": dict(sorted(files.items())),
        }
        write_json(tmp / MANIFEST, manifest, durable=self.durable)
        return self._store.publish(tmp, name, durable=self.durable)

    # -- retention ---------------------------------------------------------------------------------

    def _prune(self, *, just_written: Path | str) -> None:
        if self.keep_last is None and self.keep_best is None and self.keep_every is None:
            return
        entries = self._entries()  # from storage, so pruning after a resume sees every checkpoint
        keep = {just_written}
        valid = [e for e in entries if e.valid]
        if self.keep_last is not None:
            keep.update(e.path for e in valid[-self.keep_last :])
        if self.keep_every is not None:
            keep.update(e.path for e in entries if e.step % self.keep_every == 0)
        ranked = self._ranked(valid)
        keep.update(e.path for e in ranked[: self.keep_best or 1])
        locations = dict(self._store.steps())
        for entry in entries:
            if entry.path not in keep:
                self._store.remove(locations[entry.step])
                if entry.valid:
                    logger.info("pruned %s", entry.name)
                else:
                    logger.warning("deleted invalid checkpoint %s (%s)", entry.name, entry.reason)

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
        changed, and nothing in storage is modified. In a distributed job
        rank 0 chooses and verifies the checkpoint and every rank restores it
        (a sharded one reshards to the current number of ranks; each rank
        gets its own random state back, and a warning names the ranks whose
        state could not be mapped).

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
        store, coordinator = self._store, self._coordinator
        given = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, **stateful}
        options = {"restore_rng": restore_rng, "strict": strict, "map_location": map_location}
        if path is not None:
            candidates = [store.locate(path)]
        else:
            candidates = [where for _, where in reversed(store.steps())]
        if coordinator.is_main:
            # verified and applied from the same local copy: a remote checkpoint is downloaded once
            skipped: dict[str, str] = {}
            for where in candidates:
                with store.open(where) as folder:
                    verdict = self._check(folder, where, skipped)
                    if verdict == "ok":
                        coordinator.share(("ok", _public(where)))
                        return self._apply(folder, where, given, options)
                    if isinstance(verdict, int):
                        coordinator.share(("newer", verdict))
                        raise NewerFormatError(Path(str(_public(where))), verdict, FORMAT_VERSION)
            choice: tuple[str, Any] = ("invalid", skipped) if candidates else ("none", None)
            coordinator.share(choice)
        else:
            choice = coordinator.share(None)
            kind, detail = choice
            if kind == "ok":
                where = next(c for c in candidates if _public(c) == detail)
                with store.open(where) as folder:
                    return self._apply(folder, where, given, options)
            if kind == "newer":
                raise NewerFormatError(Path(str(self.directory)), detail, FORMAT_VERSION)
        kind, detail = choice
        if kind == "invalid":
            raise NoValidCheckpointError(self.directory, detail)
        return None

    def _apply(
        self, folder: Path, where: Location, given: dict[str, Any], options: dict[str, Any]
    ) -> CheckpointInfo:
        info = apply_checkpoint(folder, given, coordinator=self._coordinator, **options)
        return dataclasses.replace(info, path=_public(where))

    def _check(self, folder: Path, where: Location, skipped: dict[str, str]) -> str | int:
        """``"ok"``, ``"skip"`` (the reason goes to ``skipped``) or the newer format version found."""
        verdict = verify_folder(folder)
        reason = verdict.reason
        if verdict.ok:
            manifest = verdict.manifest or {}
            version = manifest.get("format_version")
            if manifest.get("format") == FORMAT and isinstance(version, int):
                return "ok" if version <= FORMAT_VERSION else version
            reason = "manifest.json is not a torchkeep checkpoint manifest"
        skipped[folder.name] = reason
        logger.warning("skipping checkpoint %s: %s", where, reason)
        return "skip"

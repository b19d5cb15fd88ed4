"""Checkpointer: the writer of a run folder, thin on top of the run package.

It combines the writer lock (taken by the first ``save``; one writer per
run), :mod:`~torchkeep.run.snapshot` (capture / apply), :mod:`~torchkeep.run.commit`
(prepare / write / agree / publish), :mod:`~torchkeep.run.retention` and an
optional background thread. Everything it reads goes through
:class:`~torchkeep.run.reader.RunReader`, which never changes the run.
"""

from __future__ import annotations

import builtins
import logging
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkeep.checkpoint import CheckpointInfo, Stateful
from torchkeep.distributed import Coordinator
from torchkeep.errors import AsyncSaveError, InvalidArgumentError, InvalidShardSizeError, MissingMetricError
from torchkeep.run import retention
from torchkeep.run.blobs import BlobIndex, collect, write_ahead
from torchkeep.run.commit import Committed, commit, warn_nonfinite
from torchkeep.run.layout import WRITER_LEASE, WRITER_LOCK, is_step, step_name
from torchkeep.run.preemption import Preemption, PreemptionOption
from torchkeep.run.reader import CheckpointEntry, RunReader, is_number, metric_value
from torchkeep.run.restore import restore_run
from torchkeep.run.retention import from_options
from torchkeep.run.snapshot import Snapshot, TensorFile, capture
from torchkeep.shards import parse_shard_size
from torchkeep.storage.base import NO_LOCK, WriterLock, open_store
from torchkeep.storage.remote import StorageOptions
from torchkeep.storage.staging import StagingBuffers
from torchkeep.weights import MapLocation

__all__ = ["CheckpointEntry", "Checkpointer"]

logger = logging.getLogger(__name__)

_RESERVED = {"model", "optimizer", "scheduler", "scaler"}


def _budget(value: int | str | None, *, async_save: bool) -> int | None:
    """``staging_budget`` in bytes (None: no limit)."""
    if value is None:
        return None
    if not async_save:
        raise InvalidArgumentError(
            "staging_budget",
            value,
            "limits the staging buffers of asynchronous saves",
            "pass async_save=True",
        )
    try:
        return parse_shard_size(value)
    except InvalidShardSizeError:
        raise InvalidArgumentError(
            "staging_budget", value, "is not a size", "pass bytes or text like '1GiB', '500MB'"
        ) from None


def _log_failure(future: Future[Committed]) -> None:
    # Logged where it happens too, in case the program ends before the next call raises it.
    error = future.exception()
    if error is not None:
        logger.error("background checkpoint save failed: %s", error)


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
            state's size, or at most ``staging_budget``.
        staging_budget (int | str | None, default None): with ``async_save``,
            the most host memory the staging buffers may hold (bytes, or text
            like ``"1GiB"``, ``"500MB"``). A state that does not fit is saved
            in two parts: what fits is copied and written in the background,
            the rest is hashed and, where the run does not hold it yet,
            written before ``save()`` returns (in packs of about the budget, a
            larger tensor alone; logged once). With ``incremental=False`` such
            a save is written whole before ``save()`` returns. None: no limit.
        storage_options (Mapping | None, default None): options of the fsspec
            filesystem of a URL (credentials, ``endpoint_url``, …).
        distributed (bool | None, default None): None: coordinate with the
            other ranks when ``torch.distributed`` is initialized (every rank
            must then construct the Checkpointer and call ``save``/``restore``).
            False: act as if this process were alone, for code that saves from
            rank 0 only (``if rank == 0: ckpts.save(...)``); only this rank's
            random state is kept and sharded (DTensor) state cannot be saved.
        read_only (bool, default False): never write: ``list``, ``best``,
            ``latest`` and ``restore`` work, ``save`` raises. Reading never
            takes the writer lock either way; this says the intent.
        retention (Policy | None, default None): a policy from
            :mod:`torchkeep.run.retention` (``KeepLast(3) | KeepEveryInterval(3600)``)
            instead of the ``keep_*`` arguments.
        preemption (bool | Sequence[str], default False): ``True`` handles
            ``SIGTERM`` and ``SIGUSR1`` (or name the signals: ``("SIGTERM",)``):
            the handler only records the signal, ``preempted`` tells the loop
            to save and stop (see :mod:`torchkeep.run.preemption`); ``close()``
            puts the earlier handlers back. Build the Checkpointer in the main thread.
        grace_period (float | None, default None): seconds the scheduler
            leaves between its signal and the kill; a save that takes longer
            warns once (:class:`GracePeriodWarning`). ``preemption.save_seconds``
            holds each save's duration either way.
        incremental (bool, default True): store each distinct tensor once in
            the run (content-addressed packs in ``blobs/``): a checkpoint
            whose tensor equals one the run already holds refers to it
            instead of writing it again, so the frozen part of a fine-tuned
            model is written by the first save only. Every checkpoint still
            reads as a whole one; ``torchkeep export-step`` copies one out as
            a standalone folder. False writes every checkpoint's tensors into
            its own folder (each folder self-contained, as format 2 did).
        trust_version_counters (bool, default False): with ``incremental``,
            skip reading a frozen parameter (``requires_grad=False``) whose
            torch version counter, memory and layout are unchanged since the
            last save. Off by default because torch does not count every
            write: writes through ``.data``, through NumPy or DLPack views,
            through ``untyped_storage()`` or another tensor ``set_()`` on the
            same storage leave the counter as it was. Buffers are always read
            (BatchNorm's kernel updates running statistics without counting).
            Without it every tensor is hashed (XXH3, about 10 GB/s here),
            which sees every change.

    One writer per run: the first ``save`` takes the run's writer lock (an
    ``flock`` on a local run, a lease object on an object store) and then
    removes what killed writers left; a second writer gets
    :class:`RunLockedError` naming the holder. ``close()`` (or leaving a
    ``with`` block) gives the lock up; so does the death of the process.

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
        read_only: bool = False,
        retention: retention.Policy | None = None,
        preemption: PreemptionOption = False,
        grace_period: float | None = None,
        incremental: bool = True,
        trust_version_counters: bool = False,
        staging_budget: int | str | None = None,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        options = {"keep_last": keep_last, "keep_best": keep_best, "keep_every": keep_every}
        if retention is not None and any(v is not None for v in options.values()):
            raise ValueError("pass either retention= or keep_last/keep_best/keep_every, not both")
        self._retention = retention or from_options(**options, monitor=monitor, mode=mode)
        self._store = open_store(directory, storage_options)
        self._reader = RunReader(directory, store=self._store)
        self.directory: Path | str = self._reader.directory
        self.read_only = read_only
        self._lock: WriterLock | None = None
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.monitor = monitor
        self.mode = mode
        self.keep_every = keep_every
        self.durable = durable
        self.async_save = async_save
        self.incremental = incremental
        if trust_version_counters and not incremental:
            raise ValueError(
                "trust_version_counters=True needs incremental=True (it skips re-reading shared tensors)"
            )
        self.trust_version_counters = trust_version_counters
        self._blobs: BlobIndex | None = None  # rank 0's view of the packs, read when it takes the lock
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Future[Committed]] | None = None
        self._staging = StagingBuffers(_budget(staging_budget, async_save=async_save))
        self._budget_logged = False
        self._coordinator = Coordinator(enabled=False if read_only else distributed)  # readers join no group
        if read_only and preemption is not False:
            raise ValueError("a read_only=True Checkpointer never saves; drop preemption= or read_only=True")
        self.preemption = Preemption(
            preemption, grace_period=grace_period, distributed=self._coordinator.active
        )

    # -- the writer lock ---------------------------------------------------------------------------

    def _take_lock(self, step: int) -> None:
        """Rank 0 takes the run's writer lock (once), then removes what dead writers left."""
        if self._lock is not None:
            return

        def take() -> WriterLock | None:
            if not self._coordinator.is_main:
                return None
            lock = self._store.lock_writer(WRITER_LOCK if self._store.atomic_publish else WRITER_LEASE)
            # holding the lock, every leftover belongs to a writer that is gone
            self._store.clean_leftovers(is_step)
            # anew each time: another writer may have changed the packs since this one last held the run
            self._blobs = BlobIndex.load(self._store)
            collect(self._store, self._blobs, durable=self.durable)  # packs of interrupted saves
            return lock

        self._lock = self._coordinator.attempt(take, step=step, stage="lock") or NO_LOCK

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

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
            committed = future.result()
        except Exception as err:
            raise AsyncSaveError(step, err) from err
        warn_nonfinite(committed, stacklevel=3)
        return committed.folder

    def close(self) -> None:
        """Flush the save in flight and stop the background thread (``with`` does this)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._release_lock()
            self.preemption.close()  # last: a signal during the final flush is still only recorded

    @property
    def preempted(self) -> bool:
        """Whether a preemption signal came: save, then stop (``preemption=`` sets the signals).

        Collective in a ``torch.distributed`` job (an ``all_reduce`` of one
        integer on a gloo group of its own, until it is ``True``): every rank
        gets the same answer at the same read, so read it on every rank once
        per step, and use that one answer for both the save and the break.

        Example:
            >>> for step in range(start, steps):
            ...     train_step()
            ...     stop = ckpts.preempted
            ...     if step % 100 == 0 or stop:
            ...         ckpts.save(step, model=model, optimizer=optimizer)
            ...     if stop:
            ...         break
        """
        return self.preemption.poll()

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

    def list(self, *, verify: bool = False) -> builtins.list[CheckpointEntry]:
        """Every checkpoint folder, oldest first (reads only; see :class:`RunReader`).

        Args:
            verify (bool, default False): check the digests too (reads
                every file); without it, only that each file has its size.
        """
        self.wait()
        return self._reader.entries(verify=verify)

    @property
    def latest(self) -> Path | str | None:
        """The newest checkpoint folder whose files are all there (sizes checked)."""
        self.wait()
        return self._reader.latest()

    @property
    def best(self) -> Path | str | None:
        """The best checkpoint folder by ``monitor``: valid, finite, carrying the metric; else ``None``."""
        self.wait()
        return self._reader.best(self.monitor, self.mode)

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
        if self.read_only:
            raise ValueError(f"{self.directory} was opened read_only=True; open it without that to save")
        clash = _RESERVED & set(stateful)
        if clash:
            raise ValueError(f"{sorted(clash)} are named parameters of save(), not extra stateful objects")
        clean_metrics = {str(k): metric_value(v) for k, v in (metrics or {}).items()}
        monitor = self.monitor
        poisoned = (
            monitor is not None
            and clean_metrics.get(monitor, 0.0) is None
            and is_number((metrics or {}).get(monitor))
        )
        bad_metrics = [str(monitor)] if poisoned else []
        if self.monitor is not None and metrics is not None and self.monitor not in clean_metrics:
            raise MissingMetricError(self.monitor, list(clean_metrics), where="this Checkpointer")
        objects = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, **stateful}
        self.preemption.save_started()
        self._staging.begin()
        snapshot = capture(
            step,
            model=model,
            objects=objects,
            epoch=epoch,
            metrics=clean_metrics,
            extra=extra,
            coordinator=self._coordinator,
            stage=self._staging.copy if self.async_save else None,
            track_versions=self.trust_version_counters,
        )
        self._take_lock(step)  # after the snapshot, so a refused value leaves the folder untouched
        if self.async_save and self._staging.unstaged and not self._write_unstaged(snapshot):
            self._staging.settle(set())  # the state is written whole below: nothing to keep staged
        if not self.async_save or self._staging.unstaged:
            committed = self._write(snapshot, bad_metrics)
            warn_nonfinite(committed, stacklevel=2)
            return committed.folder
        self._staging.settle(snapshot.staged_keys())
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchkeep-save")
        future = self._executor.submit(self._write, snapshot, bad_metrics)
        future.add_done_callback(_log_failure)
        self._pending = (step, future)
        return self._store.public(step_name(step))

    def _write_unstaged(self, snapshot: Snapshot) -> bool:
        """Store now what the staging budget left out (live tensors); False: it cannot be split,
        so the caller writes the whole save now."""
        unstaged, budget = self._staging.unstaged, self._staging.budget or 0
        live: dict[str, torch.Tensor] = {}
        owners: dict[str, tuple[TensorFile, str]] = {}
        for name, content in snapshot.files.items():
            if isinstance(content, TensorFile):
                for key in content.tensors:
                    if f"{name}:{key}" in unstaged:
                        live[f"{name}:{key}"] = content.tensors[key]
                        owners[f"{name}:{key}"] = (content, key)
        blobs = self._blobs if self.incremental else None
        split = blobs is not None and set(live) == unstaged  # sharded (DCP) tensors: not split
        if not self._budget_logged:
            self._budget_logged = True
            total = sum(t.nbytes for t in live.values())
            logger.info(
                "async save: the state does not fit staging_budget=%d bytes; %s",
                budget,
                f"save() writes {total} bytes before it returns, the rest in the background"
                if split
                else "save() writes it whole before it returns (incremental=False or sharded state)",
            )
        if not split or blobs is None:
            return False
        digests = write_ahead(
            live,
            step=snapshot.step,
            store=self._store,
            index=blobs,
            durable=self.durable,
            chunk_bytes=max(budget, 1),
        )
        for staged_key, digest in digests.items():
            content, key = owners[staged_key]
            del content.tensors[key]
            content.known[key] = digest
        self._staging.unstaged = set()
        return True

    def _write(self, snapshot: Snapshot, bad_metrics: builtins.list[str]) -> Committed:
        lock = self._lock
        if self._blobs is not None:
            self._blobs.uses.pop(step_name(snapshot.step), None)  # a replaced step's packs: read anew
        committed = commit(
            snapshot,
            store=self._store,
            coordinator=self._coordinator,
            durable=self.durable,
            bad_metrics=bad_metrics,
            before_publish=(lock or NO_LOCK).refresh,
            blobs=self._blobs if self.incremental and self._coordinator.is_main else None,
        )
        logger.info("saved checkpoint %s", committed.folder)
        self.preemption.save_finished()
        if self._coordinator.is_main:
            if self._blobs is not None:
                self._blobs.uses[step_name(snapshot.step)] = set(committed.packs)  # (not read back)
            self._prune(just_written=snapshot.step)
            if self._blobs is not None:
                collect(self._store, self._blobs, durable=self.durable)
        return committed

    # -- retention ---------------------------------------------------------------------------------

    def _prune(self, *, just_written: int) -> None:
        if self._retention is None:
            return
        entries = self._reader.entries()  # from storage, so pruning after a resume sees every checkpoint
        keep = self._retention.keep(entries) | {just_written}
        for entry in entries:
            if entry.step not in keep:
                self._store.remove(entry.name)
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
        given = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, **stateful}
        options = {"restore_rng": restore_rng, "strict": strict, "map_location": map_location}
        where = None if path is None else os.fspath(path)
        return restore_run(self._reader, self._coordinator, given, options, path=where)

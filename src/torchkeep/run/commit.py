"""Committing a checkpoint: prepare, write, agree, publish; in one process or many.

1. *prepare*: rank 0 asks the store for a fresh folder to fill (a hidden
   temporary folder in a local run, a scratch folder for an object store);
   other ranks get the same folder (shared filesystems) or a scratch one.
2. *write*: DCP shards (every rank), then rank 0 writes the snapshot's files,
   each checksummed in the same pass that writes it; the model's tensors are
   also checked for NaN/Inf in that pass. In an incremental checkpoint the
   tensor files become ``tensors.json`` and the tensors the run does not hold
   yet go to one new pack first (:mod:`torchkeep.run.blobs`).
3. *agree*: every rank reports its files (or its failure) to every other.
4. *publish*: rank 0 renews the writer lock, writes the manifest and asks
   the store to publish (rename into place, or upload the manifest last).

A failure on any rank at any stage raises on every rank and commits nothing.
"""

from __future__ import annotations

import builtins
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchkeep.distributed import Coordinator, save_shards, shard_files
from torchkeep.errors import NonFiniteCheckpointWarning
from torchkeep.run.blobs import BlobIndex, write_indexed
from torchkeep.run.layout import MANIFEST, SHARDS, TENSOR_INDEX, new_manifest, step_name
from torchkeep.run.snapshot import JsonFile, Snapshot, TensorFile
from torchkeep.storage.base import Store
from torchkeep.storage.manifest import DIGEST, file_record, write_json
from torchkeep.storage.tensorfile import write_safetensors

__all__ = ["Committed", "Written", "commit", "warn_nonfinite", "write_files"]


@dataclass(frozen=True)
class Committed:
    """A published checkpoint: its folder, what was found non-finite in it, and the packs it uses."""

    folder: Path | str
    nonfinite: builtins.list[str]
    bad_metrics: builtins.list[str]
    packs: frozenset[str] = frozenset()


@dataclass
class Written:
    """What one rank wrote: manifest records by file, the packs used, and the tensors found non-finite."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    nonfinite: builtins.list[str] = field(default_factory=list)
    blobs: dict[str, dict[str, Any]] = field(default_factory=dict)


def write_files(
    tmp: Path,
    snapshot: Snapshot,
    *,
    durable: bool,
    blobs: BlobIndex | None = None,
    store: Store | None = None,
) -> Written:
    """Write the snapshot's files into ``tmp``; one pass over each file's bytes.

    With ``blobs`` (and the run's ``store``), the tensor files become
    ``tensors.json`` plus one pack of the tensors the run does not hold yet.
    """
    out = Written()
    tensor_files = {name: c for name, c in snapshot.files.items() if isinstance(c, TensorFile)}
    if blobs is not None and store is not None and tensor_files:
        out.blobs, out.nonfinite, record = write_indexed(
            tmp,
            {name: (c.tensors, c.metadata, c.check_finite) for name, c in tensor_files.items()},
            step=snapshot.step,
            store=store,
            index=blobs,
            durable=durable,
            versions={name: c.versions for name, c in tensor_files.items()},
            known={name: c.known for name, c in tensor_files.items()},
        )
        out.records[TENSOR_INDEX] = record.entry()
    for name, content in snapshot.files.items():
        path = tmp / name
        if isinstance(content, JsonFile):
            out.records[name] = write_json(path, content.data, durable=durable).entry()
            continue
        if name in tensor_files and blobs is not None:
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            result = write_safetensors(
                fd,
                content.tensors,
                content.metadata,
                digest=DIGEST,
                fsync=durable,
                check_finite=content.check_finite,
            )
        finally:
            os.close(fd)
        out.records[name] = {"size": result.size, DIGEST: result.digest}
        out.nonfinite += result.nonfinite
    return out


def _write_rank(
    tmp: Path,
    name: str,
    snapshot: Snapshot,
    store: Store,
    coordinator: Coordinator,
    durable: bool,
    blobs: BlobIndex | None,
) -> Written:
    written = Written()
    if snapshot.shards is not None:
        shards = tmp / SHARDS
        save_shards(snapshot.shards, shards, coordinator)
        mine = shard_files(shards, coordinator.rank)
        written.records = {p.relative_to(tmp).as_posix(): file_record(p).entry() for p in mine}
        if not coordinator.is_main:
            store.upload_part(tmp, name, mine)
    if coordinator.is_main:
        own = write_files(tmp, snapshot, durable=durable, blobs=blobs, store=store)
        written.records.update(own.records)
        written.nonfinite = own.nonfinite
        written.blobs = own.blobs
    return written


def commit(
    snapshot: Snapshot,
    *,
    store: Store,
    coordinator: Coordinator,
    durable: bool,
    bad_metrics: builtins.list[str],
    before_publish: Callable[[], None],
    blobs: BlobIndex | None = None,
) -> Committed:
    """Write and publish ``snapshot`` as its step's folder (collective).

    ``before_publish`` runs on rank 0 just before the manifest is written
    (the writer lock's renewal). ``bad_metrics`` name the non-finite metrics.
    ``blobs`` (rank 0's view of the run's packs) makes the checkpoint
    incremental: tensors the run already holds are referred to, not written.

    Raises:
        DistributedSaveError: a rank failed (in one process: the error itself).
        RunLockedError: the writer lock was lost (nothing committed).
    """
    step, name = snapshot.step, step_name(snapshot.step)

    def prepare() -> Path | None:
        if coordinator.is_main:
            return store.begin(name)
        return None if store.shared else store.scratch()

    tmp = coordinator.attempt(prepare, step=step, stage="prepare")
    if store.shared:
        tmp = coordinator.share(tmp)
    if tmp is None:  # pragma: no cover - prepare returns a folder on every rank that writes
        raise RuntimeError("no folder to write the checkpoint into")
    folder = tmp

    def publish(everything: builtins.list[Written]) -> Committed | None:
        if not coordinator.is_main:
            return None
        files = {k: v for part in everything for k, v in part.records.items()}
        packs = {k: v for part in everything for k, v in part.blobs.items()}
        tensors = sorted({t for part in everything for t in part.nonfinite})
        before_publish()
        manifest = new_manifest(
            step=step,
            epoch=snapshot.epoch,
            metrics=snapshot.metrics,
            world_size=coordinator.size,
            files=files,
            nonfinite={"tensors": tensors, "metrics": bad_metrics},
            blobs=packs,
        )
        write_json(folder / MANIFEST, manifest, durable=durable, readable=True)
        published = store.publish(folder, name, durable=durable)
        return Committed(published, tensors, bad_metrics, frozenset(packs))

    try:
        written = coordinator.attempt(
            lambda: _write_rank(folder, name, snapshot, store, coordinator, durable, blobs),
            step=step,
            stage="write",
        )
        everything = coordinator.gather(written)
        final = coordinator.attempt(lambda: publish(everything), step=step, stage="commit")
    except BaseException:
        if coordinator.is_main:
            store.abandon(folder, name)
        elif not store.shared:
            shutil.rmtree(folder, ignore_errors=True)  # this rank's scratch copy
        raise
    if not coordinator.is_main and not store.shared:
        shutil.rmtree(folder, ignore_errors=True)
    return final if final is not None else Committed(store.public(name), [], [])


def warn_nonfinite(committed: Committed, *, stacklevel: int) -> None:
    """Warn, on the caller's thread, that a checkpoint just saved holds NaN/Inf."""
    if committed.nonfinite or committed.bad_metrics:
        warnings.warn(
            f"checkpoint {committed.folder} holds non-finite values (NaN/Inf): tensors "
            f"{committed.nonfinite[:10]}, metrics {committed.bad_metrics}; it is saved and flagged "
            "in its manifest, and never ranked best",
            NonFiniteCheckpointWarning,
            stacklevel=stacklevel + 1,
        )

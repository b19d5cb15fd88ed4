"""Copying one checkpoint out of its run as a standalone folder.

An incremental checkpoint's tensors live in packs its run shares among
checkpoints (:mod:`torchkeep.run.blobs`), so its folder alone is not the
checkpoint. :func:`export_step` writes a folder that is: the same state, its
tensor files inside it (``model.safetensors``, ``state.safetensors``), its
own manifest. It reads as the same checkpoint to every reader, can be
restored from any run folder it is put in, and is what to copy, upload or
archive.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import (
    CorruptFileError,
    ModelFileNotFoundError,
    NoValidCheckpointError,
    OutputExistsError,
)
from torchkeep.run.blobs import TENSOR_FILES, read_indexed_files
from torchkeep.run.layout import BLOBS, MANIFEST, TENSOR_INDEX
from torchkeep.run.reader import RunReader, is_run_folder, open_local, step_folder, verify_step
from torchkeep.storage.atomic import fsync_file
from torchkeep.storage.base import open_store
from torchkeep.storage.manifest import DIGEST, file_record, read_manifest, write_json
from torchkeep.storage.remote import StorageOptions, is_url
from torchkeep.storage.tensorfile import write_safetensors

__all__ = ["export_step"]

logger = logging.getLogger(__name__)


def export_step(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    durable: bool = True,
    storage_options: StorageOptions | None = None,
) -> Path | str:
    """Write checkpoint ``checkpoint`` as a standalone folder ``out`` (no shared packs).

    Args:
        checkpoint (str | PathLike): a checkpoint folder of a run
            (``runs/exp1/step-00000120``), or a run folder (its newest valid
            checkpoint); a URL works too.
        out (str | PathLike): the folder to write (a URL works too). Name it
            ``step-<N>`` inside a run folder to restore it with a
            :class:`~torchkeep.Checkpointer` of that folder.
        overwrite (bool, default False): replace an existing ``out``.
        durable (bool, default True): fsync the files before the folder
            appears under its name.
        storage_options (Mapping | None, default None): fsspec options for URLs.

    Returns:
        The folder written.

    Raises:
        ModelFileNotFoundError: ``checkpoint`` is not a checkpoint or run folder.
        NoValidCheckpointError: it is a run folder whose checkpoints all fail verification.
        CorruptFileError: the checkpoint does not verify (nothing is written).
        OutputExistsError: ``out`` exists and ``overwrite`` is False.

    Example:
        >>> torchkeep.export_step("runs/exp1/step-00000120", "archive/step-00000120")
    """
    target_store = open_store(out, storage_options if is_url(out) else None)
    if target_store.exists() and not overwrite:
        raise OutputExistsError(target_store.public(""))
    with open_local(checkpoint, storage_options if is_url(checkpoint) else None) as local:
        folder = step_folder(local)
        if folder is None and is_run_folder(local):
            reasons = {e.name: e.reason for e in RunReader(local).entries() if not e.valid}
            raise NoValidCheckpointError(local, reasons)
        if folder is None:
            raise ModelFileNotFoundError(local)
        verdict = verify_step(folder)
        if not verdict.ok:
            raise CorruptFileError(folder, verdict.reason)
        parent, _, name = str(target_store.url).rstrip("/").rpartition("/")
        store = open_store(parent or ".", storage_options if is_url(out) else None)
        tmp = store.begin(name)
        try:
            manifest = _write_standalone(folder, tmp, durable=durable)
            write_json(tmp / MANIFEST, manifest, durable=durable, readable=True)
            written = store.publish(tmp, name, durable=durable)
        except BaseException:
            store.abandon(tmp, name)
            raise
    logger.info("exported %s to %s", folder, written)
    return written


def _write_standalone(source: Path, tmp: Path, *, durable: bool) -> dict[str, Any]:
    """Fill ``tmp`` with ``source``'s files, its indexed tensor files written out; return the manifest."""
    manifest = read_manifest(source)
    files: dict[str, Any] = {}
    for name, (tensors, metadata) in read_indexed_files(
        source, TENSOR_FILES, device=torch.device("cpu")
    ).items():
        path = tmp / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            result = write_safetensors(fd, tensors, metadata, digest=DIGEST, fsync=durable)
        finally:
            os.close(fd)
        files[name] = {"size": result.size, DIGEST: result.digest}
    for name in manifest["files"]:
        if name == TENSOR_INDEX:
            continue
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, path)
        if durable:
            fsync_file(path)
        files[name] = file_record(path).entry()
    out = {key: value for key, value in manifest.items() if key != BLOBS}
    out["files"] = dict(sorted(files.items()))
    return out

"""One weights file from a checkpoint folder, sharded or not: for inference or sharing.

``consolidate`` reads the model's tensors of a Checkpointer checkpoint (the
``shards/`` written through DCP by many ranks, or the single safetensors file
of a one-process or DDP run), or of any DCP checkpoint folder, and writes them
as one ``.safetensors`` / ``.pt`` state dict, as :func:`~torchkeep.save_weights`
does. The whole model is gathered in host memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from torchkeep.distributed import check_shard_metadata, load_shards
from torchkeep.errors import CorruptFileError, ModelFileNotFoundError, UnsupportedFormatError
from torchkeep.run.layout import MANIFEST, SHARD_MODEL, SHARDS
from torchkeep.run.reader import RunReader, is_run_folder, open_local, verify_step
from torchkeep.run.snapshot import model_weights
from torchkeep.storage.remote import StorageOptions, is_url
from torchkeep.weights import StateDict, save_weights

__all__ = ["consolidate", "is_checkpoint_folder", "read_checkpoint_weights"]

logger = logging.getLogger(__name__)

_DCP_METADATA = ".metadata"


def _dcp_weights(folder: Path, *, prefixes: tuple[str, ...]) -> StateDict:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = check_shard_metadata(folder, allow_pickled=True)
    entries = {
        key: md for key, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)
    }
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in entries)), "")
    tensors = {
        key: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in entries.items()
        if key.startswith(prefix)
    }
    load_shards(tensors, folder, None, allow_pickled=True)
    return {key[len(prefix) :]: value for key, value in tensors.items()}


def is_checkpoint_folder(path: Path) -> bool:
    """Whether ``path`` is a checkpoint folder, a run folder, or a DCP folder (weights inside)."""
    return (path / MANIFEST).is_file() or (path / _DCP_METADATA).is_file() or is_run_folder(path)


def read_checkpoint_weights(folder: Path) -> StateDict:
    """The model's full tensors from a checkpoint folder (Checkpointer, sharded or not, or plain DCP);
    a run folder stands for its newest valid checkpoint.

    Raises:
        CorruptFileError: the folder fails its manifest.
        UnsafeFileError: DCP metadata that would run code.
        UnsupportedFormatError: not a checkpoint folder.
    """
    if not (folder / MANIFEST).is_file() and is_run_folder(folder):
        latest = RunReader(folder).latest()
        if latest is None:
            raise ModelFileNotFoundError(folder)
        folder = Path(latest)
    if (folder / MANIFEST).is_file():
        verdict = verify_step(folder)
        if not verdict.ok:
            raise CorruptFileError(folder, verdict.reason)
        weights = model_weights(folder)
        return weights if weights is not None else _dcp_weights(folder / SHARDS, prefixes=(SHARD_MODEL,))
    if (folder / _DCP_METADATA).is_file():  # a DCP folder of another tool: its model's tensors, or all
        return _dcp_weights(folder, prefixes=(SHARD_MODEL, "model.", "app.model.", ""))
    raise UnsupportedFormatError(
        folder,
        "a folder that is neither a torchkeep checkpoint nor a torch.distributed.checkpoint folder",
        "pass a checkpoint folder (e.g. runs/exp1/step-00000120) or a DCP folder with a .metadata file",
    )


def consolidate(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    storage_options: StorageOptions | None = None,
) -> Path | str:
    """Write the model weights of a (sharded) checkpoint folder as one file.

    Args:
        checkpoint (str | PathLike): a checkpoint folder written by
            :class:`~torchkeep.Checkpointer` (by any number of ranks; a run
            folder stands for its newest valid checkpoint), or a
            ``torch.distributed.checkpoint`` folder; a URL works too.
        out (str | PathLike): the file to write; ``.safetensors`` or
            ``.pt``/``.pth``/``.bin`` by suffix (a URL works too).
        dtype (torch.dtype | None, default None): cast floating-point tensors.
        metadata (Mapping[str, str] | None, default None): text stored with the weights.
        storage_options (Mapping | None, default None): fsspec options for URLs.

    Returns:
        The file written.

    Raises:
        ModelFileNotFoundError: no such folder.
        CorruptFileError: the checkpoint fails its manifest.
        UnsafeFileError: its DCP metadata would run code.
        UnsupportedFormatError: not a checkpoint folder.

    Example:
        >>> torchkeep.consolidate("runs/exp1/step-00000120", "model.safetensors")
    """
    with open_local(checkpoint, storage_options if is_url(checkpoint) else None) as folder:
        state = read_checkpoint_weights(folder)
    options = storage_options if is_url(out) else None
    written = save_weights(state, out, dtype=dtype, metadata=metadata, storage_options=options)
    logger.info("consolidated %d tensors of %s into %s", len(state), checkpoint, written)
    return written

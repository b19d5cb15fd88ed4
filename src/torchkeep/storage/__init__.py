"""Where torchkeep keeps bytes: one Store protocol behind single files and run folders.

============  ==================================================================
base          the Store protocol, the backend registry, ``open_store`` by scheme
local         local folders: atomic renames, ``flock`` writer lock
fsspec_store  any fsspec URL (s3://, gs://, memory://): manifest-last commits, leases
atomic        atomic file replacement, fsync, deletion that frees data in the background
manifest      checksummed manifests: sizes and digests, verification
digests       content digests of tensors (dtype, shape, bytes): what "the same tensor" means
tensorfile    the one-pass safetensors writer (digest and NaN/Inf check as it writes)
remote        fsspec locations and URL resolution
staging       host buffers for asynchronous saves
============  ==================================================================

A new backend is one module implementing :class:`~torchkeep.storage.base.Store`
plus a ``register_backend("scheme", Factory)`` line in it (and its import in
``base._load_backends``).
"""

from __future__ import annotations

import os
from typing import Any

from torchkeep.storage.atomic import atomic_target, fsync_dir
from torchkeep.storage.base import Store, WriterLock, open_store

__all__ = ["Store", "WriterLock", "atomic_target", "file_store", "fsync_dir", "open_store"]


def file_store(path: str | os.PathLike[str], storage_options: Any = None) -> Store:
    """The store whose root is the single file ``path`` (address it as ``""``)."""
    return open_store(path, storage_options)

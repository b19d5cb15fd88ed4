"""The storages a ``torch.save`` pickle refers to: each built once per key, on the device asked
for, within the byte budget (shared by the zip and the legacy reader)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CorruptFileError, LimitExceededError, UnsupportedFormatError
from torchkeep.safety.allowlist import StorageRef, StorageType
from torchkeep.safety.limits import Limits

__all__ = ["STORAGE_KEY", "Storages", "meta_storage"]

STORAGE_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_LOCATION = re.compile(r"[a-z_]{1,32}(:[0-9]{1,4})?")


class Storages:
    """Builds storages for persistent ids, once per key, and keeps the byte budget."""

    def __init__(
        self,
        path: Path,
        *,
        device: torch.device | None,
        limits: Limits,
        meta: bool,
    ) -> None:
        self.path = path
        self.device = device
        self.limits = limits
        self.meta = meta
        self.total = 0
        self.loaded: dict[str, StorageRef] = {}
        self._targets: dict[str, torch.device] = {}

    def _target(self, location: str) -> torch.device:
        known = self._targets.get(location)
        if known is not None:  # every storage of a file names the same location or two
            return known
        target = self._resolve(location)
        self._targets[location] = target
        return target

    def _resolve(self, location: str) -> torch.device:
        if not _LOCATION.fullmatch(location):
            raise CorruptFileError(self.path, f"a storage has the invalid location {location!r}")
        if self.device is not None:
            return self.device
        try:
            saved = torch.device(location)
        except RuntimeError as err:
            raise CorruptFileError(self.path, f"a storage has the invalid location {location!r}") from err
        if saved.type != "cpu" and not _device_available(saved):
            raise UnsupportedFormatError(
                self.path,
                f"a file with tensors saved on {location}",
                "That device is not available here; pass map_location='cpu' (or another device).",
            )
        return saved

    def get(self, key: str, stype: StorageType, numel: int, location: str, build: Any) -> StorageRef:
        """The storage ``key``: built by ``build(key, nbytes)`` the first time, then the same one.

        ``build`` is one function for every key (not a closure made per
        storage: this runs once per tensor).
        """
        if not STORAGE_KEY.fullmatch(key):
            raise CorruptFileError(self.path, f"a storage has the invalid key {key[:40]!r}")
        known = self.loaded.get(key)
        if known is not None:
            if (known.dtype, known.numel) != (stype.dtype, numel):
                raise CorruptFileError(
                    self.path,
                    f"storage {key!r} is referenced as {numel} x {stype.dtype} and as "
                    f"{known.numel} x {known.dtype}",
                )
            return known
        nbytes = numel * stype.dtype.itemsize
        self.total += nbytes
        if self.total > self.limits.max_bytes:
            raise LimitExceededError(
                self.path, "max_bytes", self.total, self.limits.max_bytes, what="tensor data"
            )
        device = self._target(location)
        if self.meta:
            storage = meta_storage(nbytes)
            build(key, nbytes)  # still checks that the record exists and has the declared size
        else:
            storage = build(key, nbytes)
            if device.type != "cpu":
                storage = _move(storage, device)
        ref = StorageRef(key, storage, stype.dtype, numel)
        self.loaded[key] = ref
        return ref


def _device_available(device: torch.device) -> bool:
    module = getattr(torch, device.type, None)
    available = getattr(module, "is_available", None)
    try:
        return bool(available()) if callable(available) else False
    except RuntimeError:
        return False


def _move(storage: torch.UntypedStorage, device: torch.device) -> torch.UntypedStorage:
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)
    moved: torch.UntypedStorage = flat.to(device).untyped_storage()
    return moved


def meta_storage(nbytes: int) -> torch.UntypedStorage:
    """A storage of ``nbytes`` on the meta device: the size without the memory."""
    return torch.empty(nbytes, dtype=torch.uint8, device="meta").untyped_storage()

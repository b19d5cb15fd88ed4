"""Writing weights as a Hugging Face sharded checkpoint: shards first, the index last, never half a save.

``save_weights(model, folder, max_shard_size="5GB")`` hands off here. The
layout is the one ``save_pretrained`` writes, so ``from_pretrained(folder)``
and :func:`~torchkeep.load_weights` both read it:

- ``folder/`` (or ``folder/model.safetensors[.index.json]``): safetensors
  shards ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``;
- ``folder/pytorch_model.bin[.index.json]``: ``torch.save`` shards
  ``pytorch_model-0000k-of-0000n.bin`` + ``pytorch_model.bin.index.json``.

Everything that fits in one shard is one ``model.safetensors`` (or
``pytorch_model.bin``) without an index, as transformers does. Tensors are
packed in state-dict order; one larger than ``max_shard_size`` gets a shard
of its own. Tied weights are stored once: in safetensors shards the other
names are listed in the shard header's ``torchkeep.aliases`` record (and
left out of the index, as transformers leaves out ``lm_head.weight``); in
``.bin`` shards both names are in the pickle, which stores the data once.

Crash safety: each shard is written atomically; the index (the file a reader
starts from) is written last, so a killed save leaves the previous index and
its shards untouched. Shard names the live index uses are never overwritten:
a save with the same shard count writes ``model-b-0000k-of-0000n`` instead
(and the next one the plain names again). Files of the previous save are
removed only once the new entry point is in place, the entry points that
readers try before the new one first, so at every moment a reader finds one
complete save.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import re
from pathlib import Path
from typing import Protocol

import torch

from torchkeep.errors import InvalidShardSizeError
from torchkeep.formats.base import FileFormat
from torchkeep.formats.hf import (
    ENTRY_POINTS,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    TORCH_INDEX,
    TORCH_WEIGHTS,
    read_index,
)
from torchkeep.storage import atomic_target
from torchkeep.storage.atomic import fsync_dir
from torchkeep.storage.remote import Remote, scratch_dir

__all__ = ["WriteFile", "parse_shard_size", "plan_shards", "save_shards"]

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_SHARD_NAME = re.compile(r"^(model|pytorch_model)(-b)?-\d{5}-of-\d{5}\.(safetensors|bin)$")


class WriteFile(Protocol):
    """The single-file writer of ``weights.py``: one shard is written exactly as one weights file."""

    def __call__(
        self,
        target: Path,
        fmt: FileFormat,
        state: StateDict,
        kept: StateDict,
        aliases: dict[str, str],
        meta: dict[str, str],
        *,
        durable: bool,
    ) -> None: ...


def parse_shard_size(value: int | str) -> int:
    """Bytes from ``max_shard_size``: an int, or text like ``"5GB"``, ``"500MB"``, ``"2GiB"``.

    ``KB``/``MB``/``GB``/``TB`` count in thousands (as Hugging Face does);
    ``KiB``/``MiB``/``GiB``/``TiB`` in 1024s; case does not matter.

    Raises:
        InvalidShardSizeError: not a positive size.

    Example:
        >>> parse_shard_size("50KB")
        50000
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidShardSizeError(value, f"it is a {type(value).__name__}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise InvalidShardSizeError(
                value, "it is not a number with a unit of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
            )
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise InvalidShardSizeError(value, "it is not a positive number of bytes")
    return size


def plan_shards(kept: StateDict, max_bytes: int) -> list[list[str]]:
    """Stored keys grouped into shards of at most ``max_bytes`` each (a larger tensor alone), in order."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in kept.items():
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += t.nbytes
    return shards


def _layout(location: Path) -> tuple[Path, FileFormat]:
    """The folder and the format: an entry-point name (``.../pytorch_model.bin.index.json``) picks both."""
    if location.name in ENTRY_POINTS:
        torch_format = location.name.startswith("pytorch_model")
        return location.parent, FileFormat.TORCH_ZIP if torch_format else FileFormat.SAFETENSORS
    return location, FileFormat.SAFETENSORS  # any other name is the folder (``bert-v1.5/`` too)


def _live_names(folder: Path) -> set[str]:
    """Shard names that an index in ``folder`` uses now (never overwritten while it is there)."""
    names: set[str] = set()
    for index in (SAFE_INDEX, TORCH_INDEX):
        if (folder / index).is_file():
            with contextlib.suppress(Exception):  # a broken index protects nothing; it is replaced
                names.update(p.name for p in read_index(folder / index).shards)
    return names


def _shard_names(folder: Path, fmt: FileFormat, count: int) -> list[str]:
    stem, suffix = ("model", "safetensors") if fmt is FileFormat.SAFETENSORS else ("pytorch_model", "bin")
    live = _live_names(folder)
    for variant in ("", "-b"):
        names = [f"{stem}{variant}-{k:05d}-of-{count:05d}.{suffix}" for k in range(1, count + 1)]
        if not live.intersection(names):
            return names
    raise AssertionError("unreachable: the live index cannot use both name sets")  # pragma: no cover


def save_shards(
    location: Path | Remote,
    state: StateDict,
    kept: StateDict,
    aliases: dict[str, str],
    meta: dict[str, str],
    *,
    max_shard_size: int | str,
    durable: bool,
    write: WriteFile,
) -> Path | str:
    """Write ``kept`` (plus ``aliases`` of ``state``) as a sharded checkpoint; see the module docs.

    Args:
        location: the folder, or the index path naming the format; a Remote is
            written to a scratch folder and uploaded, shards first.
        state: every key, in order (tied names included).
        kept: the tensors to store, each once (``weights.compact_tensors``).
        aliases: ``tied name -> stored key``.
        meta: text metadata stored in every shard.
        max_shard_size: the most bytes of tensor data per shard.
        durable: fsync each file and the folder.
        write: the single-file writer.

    Returns:
        The folder (the URL, for a Remote).

    Raises:
        InvalidShardSizeError: ``max_shard_size`` is not a positive size.
    """
    max_bytes = parse_shard_size(max_shard_size)
    if isinstance(location, Remote):
        is_index = location.name in ENTRY_POINTS
        remote = (
            Remote(location.fs, posixpath.dirname(location.path), posixpath.dirname(location.url))
            if is_index
            else location
        )
        with scratch_dir() as scratch:
            folder, fmt = _layout(scratch / location.name if is_index else scratch)
            for name in _write_shards(folder, fmt, state, kept, aliases, meta, max_bytes, False, write):
                remote.join(name).upload(folder / name)  # in order: the entry point last
        return remote.url
    folder, fmt = _layout(location)
    _write_shards(folder, fmt, state, kept, aliases, meta, max_bytes, durable, write)
    return folder


def _write_shards(
    folder: Path,
    fmt: FileFormat,
    state: StateDict,
    kept: StateDict,
    aliases: dict[str, str],
    meta: dict[str, str],
    max_bytes: int,
    durable: bool,
    write: WriteFile,
) -> list[str]:
    """Write the shards, then the entry point; remove the previous save's files. Returns names, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    groups = plan_shards(kept, max_bytes)
    safetensors = fmt is FileFormat.SAFETENSORS
    if len(groups) == 1:
        entry = SAFE_WEIGHTS if safetensors else TORCH_WEIGHTS
        logger.debug("shard 1 of 1: %s", entry)
        write(folder / entry, fmt, state, kept, aliases, meta, durable=durable)
        _remove_previous(folder, entry, keep={entry})
        return [entry]
    names = _shard_names(folder, fmt, len(groups))
    weight_map: dict[str, str] = {}
    for number, (name, keys) in enumerate(zip(names, groups, strict=True), start=1):
        logger.debug("shard %d of %d: %s", number, len(groups), name)
        stored = set(keys)
        part_aliases = {a: c for a, c in aliases.items() if c in stored}
        part_state = {k: state[k] for k in state if k in stored or k in part_aliases}
        write(folder / name, fmt, part_state, {k: kept[k] for k in keys}, part_aliases, meta, durable=durable)
        listed = keys if safetensors else list(part_state)  # .bin shards name tied keys in the pickle
        weight_map.update(dict.fromkeys(listed, name))
    entry = SAFE_INDEX if safetensors else TORCH_INDEX
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in kept.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    logger.debug("index: %s", entry)
    with atomic_target(folder / entry, durable=durable) as tmp:
        tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    _remove_previous(folder, entry, keep={entry, *names})
    logger.info("saved %d tensors in %d shards to %s", len(state), len(groups), folder / entry)
    return [*names, entry]


def _remove_previous(folder: Path, entry: str, *, keep: set[str]) -> None:
    """Remove the weights files of earlier saves: entry points readers try first, then stale shards."""
    logger.debug("removing the previous save's files in %s", folder)
    removed = False
    for name in ENTRY_POINTS:  # in the order readers try them: the new save is found at every step
        if name != entry and (folder / name).is_file():
            (folder / name).unlink()
            removed = True
    for path in sorted(folder.iterdir()):
        name = path.name
        stale_temp = (
            name.startswith(".") and ".tmp-" in name and _SHARD_NAME.match(name[1:].split(".tmp-")[0])
        )
        if name not in keep and (_SHARD_NAME.match(name) or stale_temp) and path.is_file():
            path.unlink()
            removed = True
    if removed:
        fsync_dir(folder)

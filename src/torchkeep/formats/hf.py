"""Hugging Face model folders and sharded checkpoints: which files hold the weights, and the index check.

``save_pretrained`` writes one of four entry points into a model folder,
which ``from_pretrained`` tries in this order (and so does this module):

- ``model.safetensors``: all weights in one safetensors file;
- ``model.safetensors.index.json`` + ``model-0000k-of-0000n.safetensors``;
- ``pytorch_model.bin``: one ``torch.save`` zip;
- ``pytorch_model.bin.index.json`` + ``pytorch_model-0000k-of-0000n.bin``.

A folder with ``adapter_config.json`` is a PEFT adapter: its
``adapter_model.safetensors`` (or ``.bin``) holds the weights.

The index is JSON: ``{"metadata": {"total_size": N, ...}, "weight_map":
{tensor name: shard file name}}``. It is checked strictly before any shard
is opened (shard names are plain file names in the index's folder; every
shard exists), and each shard's content must match it exactly: every listed
tensor in the shard the index names, no tensor the index does not list
there. Each shard is read by the very reader a single file goes through
(``weights._read_weights``: the one sniffer, the strict safetensors header
check, the allowlist ``torch.save`` reader), so every safety check applies
per shard; ``limits.max_bytes`` bounds the sum over all shards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchkeep._adapters import find_adapter
from torchkeep.errors import CorruptFileError, LimitExceededError, UnsafeFileError, first_line
from torchkeep.formats.base import FileFormat
from torchkeep.formats.detect import detect_format
from torchkeep.formats.safetensors import SafetensorsHeader, read_safetensors_header
from torchkeep.safety.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "ENTRY_POINTS",
    "SAFE_INDEX",
    "SAFE_WEIGHTS",
    "TORCH_INDEX",
    "TORCH_WEIGHTS",
    "HFWeights",
    "ShardIndex",
    "check_shard_names",
    "find_hf_weights",
    "is_index_name",
    "read_hf_weights",
    "read_index",
]

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
# transformers' from_pretrained order: safetensors first, one file before an index
ENTRY_POINTS = (SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX)
_INDEX_SUFFIX = ".index.json"

StateDict = dict[str, torch.Tensor]
ReadFile = Callable[[Path, Limits], StateDict]


def is_index_name(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is named like a shard index (``*.index.json``)."""
    return os.fspath(path).endswith(_INDEX_SUFFIX)


@dataclass(frozen=True)
class ShardIndex:
    """A checked shard index.

    Attributes:
        path: the index file.
        weight_map: tensor name -> shard file name (plain names in ``path``'s folder).
        total_size: ``metadata.total_size`` when the index has one.
        metadata: the index's ``metadata`` object (empty without one).
    """

    path: Path
    weight_map: dict[str, str]
    total_size: int | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def shards(self) -> tuple[Path, ...]:
        """The shard files, each once, in the order the index first names them."""
        return tuple(self.path.parent / name for name in dict.fromkeys(self.weight_map.values()))

    def keys_in(self, shard: Path) -> list[str]:
        """The tensor names the index puts in ``shard``."""
        return [key for key, name in self.weight_map.items() if name == shard.name]


@dataclass(frozen=True)
class HFWeights:
    """Where the weights of a Hugging Face folder (or of one index file) are.

    Attributes:
        source: the folder or index file asked for.
        files: the files to read: one weights file, or the shards of ``index``.
        index: the checked shard index, for a sharded checkpoint.
    """

    source: Path
    files: tuple[Path, ...]
    index: ShardIndex | None = None

    @property
    def description(self) -> str:
        """What the layout is, e.g. ``"safetensors, 3 shards (model.safetensors.index.json)"``."""
        if self.index is None:
            return f"{self.files[0].name} in a model folder"
        kind = "safetensors" if self.index.path.name.startswith("model.safetensors") else "torch.save"
        return f"{kind}, {len(self.files)} shards ({self.index.path.name})"

    def metadata_text(self) -> dict[str, str]:
        """The index's metadata as text (what ``inspect`` shows)."""
        if self.index is None:
            return {}
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in self.index.metadata.items()}


def find_hf_weights(path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS) -> HFWeights | None:
    """The weights of a Hugging Face model folder, a PEFT adapter folder, or a shard index.

    Args:
        path (str | PathLike): a folder, or a ``*.index.json`` file.
        limits (Limits, default Limits()): bounds for the index (its size, its tensor count).

    Returns:
        The files to read, or None when ``path`` is none of these (a plain
        weights file, or a folder without Hugging Face weights in it).

    Raises:
        CorruptFileError: the index is malformed or names a missing shard.
        UnsafeFileError: the index names a shard outside its folder.
        ModelFileNotFoundError: an adapter folder holds no adapter file.
    """
    p = Path(path)
    if p.is_file() and is_index_name(p):
        index = read_index(p, limits=limits)
        return HFWeights(p, index.shards, index)
    if not p.is_dir():
        return None
    adapter = find_adapter(p)
    if adapter is not None:
        _check_inside(p, adapter.weights, p / adapter.weights.name)
        return HFWeights(p, (adapter.weights,))
    present = [name for name in ENTRY_POINTS if (p / name).is_file()]
    if not present:
        return None
    chosen = p / present[0]
    if any(n.startswith("model.") for n in present) and any(n.startswith("pytorch_model") for n in present):
        logger.info(
            "%s holds both safetensors and .bin weights; reading %s (safetensors, as transformers does)",
            p,
            chosen.name,
        )
    if is_index_name(chosen):
        index = read_index(chosen, limits=limits)
        return HFWeights(p, index.shards, index)
    _check_inside(p, chosen, chosen)
    return HFWeights(p, (chosen,))


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice")
        out[key] = value
    return out


def _load_json(path: Path, limits: Limits) -> object:
    size = path.stat().st_size
    if size > limits.max_header_bytes:
        raise LimitExceededError(path, "max_header_bytes", size, limits.max_header_bytes, what="the index")
    try:
        return json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_unique_pairs)
    except (ValueError, RecursionError) as err:  # bad UTF-8, bad JSON, duplicate keys, deep nesting
        raise CorruptFileError(path, f"the shard index is not valid JSON ({first_line(err)[:120]})") from None


def read_index(path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS) -> ShardIndex:
    """Parse and check a shard index (``model.safetensors.index.json`` and the like).

    Args:
        path (str | PathLike): the index file.
        limits (Limits, default Limits()): ``max_header_bytes`` bounds the
            file, ``max_tensors`` the entries of its ``weight_map``.

    Returns:
        The :class:`ShardIndex`; every shard it names exists in its folder.

    Raises:
        CorruptFileError: not a JSON object with ``weight_map: {str: str}``
            (and an optional ``metadata`` object whose ``total_size`` is an
            int), or a shard it names is missing.
        UnsafeFileError: a shard name is not a plain file name in the index's
            folder (``/``, ``..``, an absolute path, a symlink leading out).
        LimitExceededError: the index is larger than ``limits`` allow.

    Example:
        >>> read_index("gpt2/model.safetensors.index.json").shards
    """
    p = Path(path)
    data = _load_json(p, limits)
    if not isinstance(data, dict):
        raise CorruptFileError(p, f"the shard index is a JSON {type(data).__name__}, not an object")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        found = (
            "no 'weight_map'"
            if weight_map is None
            else f"a 'weight_map' that is a {type(weight_map).__name__}"
        )
        raise CorruptFileError(
            p, f"the shard index has {found}; it needs an object of tensor name -> shard file"
        )
    if not weight_map:
        raise CorruptFileError(p, "the shard index's 'weight_map' lists no tensors")
    if len(weight_map) > limits.max_tensors:
        raise LimitExceededError(p, "max_tensors", len(weight_map), limits.max_tensors, what="the index")
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise CorruptFileError(
            p, f"the shard index's 'metadata' is a {type(metadata).__name__}, not an object"
        )
    total_size = metadata.get("total_size")
    if total_size is not None and (type(total_size) is not int or total_size < 0):
        raise CorruptFileError(
            p, f"the shard index's metadata.total_size is {total_size!r}, not a byte count"
        )
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise CorruptFileError(
                p, f"the shard index maps {key!r} to a {type(name).__name__}, not a file name"
            )
        _check_name(p, key, name)
    index = ShardIndex(p, dict(weight_map), total_size, dict(metadata))
    for shard in index.shards:
        if not shard.is_file():
            keys = index.keys_in(shard)
            raise CorruptFileError(
                p,
                f"the shard {shard.name!r} it names (for {len(keys)} tensors, e.g. {keys[0]!r}) is missing "
                f"from {p.parent}",
                member=shard.name,
            )
        _check_inside(p, shard, p.parent / shard.name)
    return index


def _check_name(index: Path, key: str, name: str) -> None:
    if not name or "/" in name or "\\" in name or "\0" in name or name in {".", ".."} or ":" in name:
        raise UnsafeFileError(
            index,
            reason=f"names the shard {name!r} for {key!r}, which is not a plain file name in the index's "
            "folder: reading it would leave the folder",
        )


def _allowed_roots(folder: Path) -> list[Path]:
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":  # the Hugging Face hub cache: snapshots/<rev>/x -> ../../blobs/<hash>
        roots.append(real.parent.parent / "blobs")
    return roots


def _check_inside(source: Path, file: Path, shown: Path) -> None:
    """Refuse a file (a symlink) whose target lies outside its folder (or the hub cache's blobs)."""
    real = file.resolve()
    if not any(real.is_relative_to(root) for root in _allowed_roots(file.parent)):
        raise UnsafeFileError(
            source,
            reason=f"names {shown.name!r}, a link to {real} outside its folder; copy the file into the "
            "folder if you mean to read it",
        )


def check_shard_names(index: ShardIndex, shard: Path, stored: Iterable[str]) -> None:
    """Check that ``shard`` holds exactly the tensors the index puts in it.

    Args:
        index (ShardIndex): the checked index.
        shard (Path): one of its shards.
        stored (Iterable[str]): the tensor names the shard holds.

    Raises:
        CorruptFileError: a listed tensor is not in the shard, or the shard
            holds one the index lists elsewhere or not at all.
    """
    stored_names = list(stored)
    expected = index.keys_in(shard)
    held = set(stored_names)
    for key in expected:
        if key not in held:
            raise CorruptFileError(
                index.path,
                f"the index puts {key!r} in the shard {shard.name!r}, which does not hold it",
                member=shard.name,
            )
    wanted = set(expected)
    for key in stored_names:
        if key not in wanted:
            where = index.weight_map.get(key)
            listed = f"the index puts in {where!r}" if where else "the index does not list"
            raise CorruptFileError(
                index.path, f"the shard {shard.name!r} holds {key!r}, which {listed}", member=shard.name
            )


def _headers(index: ShardIndex, limits: Limits) -> dict[Path, SafetensorsHeader]:
    """The safetensors shards' headers, each checked against the index before any data is read."""
    headers: dict[Path, SafetensorsHeader] = {}
    for shard in index.shards:
        if detect_format(shard, limits=limits) is FileFormat.SAFETENSORS:
            header = read_safetensors_header(shard, limits=limits)
            check_shard_names(index, shard, (t.name for t in header.tensors))
            headers[shard] = header
    return headers


def _storage_bytes(state: Mapping[str, torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in state.values():
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def read_hf_weights(weights: HFWeights, read_file: ReadFile, *, limits: Limits = DEFAULT_LIMITS) -> StateDict:
    """The state dict of a Hugging Face folder or sharded checkpoint, each file read by ``read_file``.

    Args:
        weights (HFWeights): what :func:`find_hf_weights` found.
        read_file (Callable[[Path, Limits], dict[str, Tensor]]): the single-file reader.
        limits (Limits, default Limits()): ``max_bytes`` bounds the total over all shards.

    Returns:
        ``dict[str, Tensor]``, shard after shard.

    Raises:
        CorruptFileError: a shard does not hold what the index says, or two shards hold one name.
        LimitExceededError: all shards together hold more than ``limits.max_bytes``.
        Any error of ``read_file`` for a shard (e.g. UnsafeFileError for a pickle that acts).
    """
    index = weights.index
    if index is None:
        return read_file(weights.files[0], limits)
    headers = _headers(index, limits)
    used = sum(t.nbytes for h in headers.values() for t in h.tensors)
    if used > limits.max_bytes:
        raise LimitExceededError(
            index.path, "max_bytes", used, limits.max_bytes, what="the shards' tensor data"
        )
    state: StateDict = {}
    for shard in index.shards:
        budget = (
            limits if shard in headers else dataclasses.replace(limits, max_bytes=limits.max_bytes - used)
        )
        part = read_file(shard, budget)
        if shard not in headers:
            check_shard_names(index, shard, part)
            used += _storage_bytes(part)
        for key in part:
            if key in state:
                raise CorruptFileError(index.path, f"{key!r} is in two shards", member=shard.name)
        state.update(part)
    logger.info("read %d tensors from %d shards of %s", len(state), len(index.shards), index.path)
    return state

"""Saving and loading weights: state dicts as safetensors or ``torch.save`` files.

``save_weights`` writes a plain ``dict[str, Tensor]`` that other tools read
without torchkeep (``safetensors.torch.load_file`` or
``torch.load(path, weights_only=True)``). ``load_weights`` reads any weights
file met in the wild and never runs code from it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import nn

from torchkeep.errors import (
    CorruptFileError,
    InvalidMetadataError,
    LimitExceededError,
    MissingClassError,
    NotAStateDictError,
    UnsafeFileError,
    UnsupportedDtypeError,
    first_line,
)
from torchkeep.formats import (
    SAFETENSORS_DTYPES,
    FileFormat,
    detect_format,
    read_safetensors_header,
    suffix_format,
)
from torchkeep.formats.hf import find_hf_weights, read_hf_weights
from torchkeep.safety import DEFAULT_LIMITS, Limits, load_torch_file, scan
from torchkeep.safety.aliases import ALIASES_KEY, check_aliases
from torchkeep.safety.torchfile import METADATA_RECORD, read_metadata_record, torch_prefix
from torchkeep.safety.ziparchive import ZipArchive
from torchkeep.shards import parse_shard_size, save_shards
from torchkeep.storage import atomic_target, file_store
from torchkeep.storage.remote import StorageOptions, resolve
from torchkeep.storage.tensorfile import read_safetensors, write_safetensors
from torchkeep.storage.torchzip import save_torch_zip
from torchkeep.trainable_only import trainable_state

__all__ = [
    "MapLocation",
    "cast_floating",
    "compact_tensors",
    "extract_state_dict",
    "load_weights",
    "read_metadata",
    "read_torch_file",
    "restore_aliases",
    "save_weights",
    "to_state_dict",
]

logger = logging.getLogger(__name__)

MapLocation = str | torch.device
StateDict = dict[str, torch.Tensor]

# Where checkpoint dicts written by common tools keep the model's weights.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
_RESERVED_PREFIX = "torchkeep."
_ALIASES_KEY = ALIASES_KEY
_PT_METADATA_RECORD = METADATA_RECORD
# dtypes the installed safetensors both writes and reads back (it writes F8_E8M0 but cannot read it)
_SAFETENSORS_TORCH_DTYPES = {
    name for code, (name, _bits) in SAFETENSORS_DTYPES.items() if code not in {"F8_E8M0", "F4"}
}


def to_state_dict(obj: nn.Module | Mapping[str, Any]) -> StateDict:
    """The state dict of a module, or a mapping checked to be ``str -> Tensor``.

    An object that stands for a model's weights without being the model (a
    :class:`torchkeep.EMA`) gives its ``model_state_dict()``.

    Raises:
        NotAStateDictError: ``obj`` is neither a module nor a mapping of tensors.
    """
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if not isinstance(obj, Mapping) and callable(getattr(obj, "model_state_dict", None)):
        obj = obj.model_state_dict()
    if not isinstance(obj, Mapping):
        raise NotAStateDictError(None, f"a {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise NotAStateDictError(None, f"a dict with the non-string key {key!r}")
        if not isinstance(value, torch.Tensor):
            raise NotAStateDictError(
                None,
                f"a dict whose entry {key!r} is a {type(value).__name__}",
                hint="keep only tensors in weights; save other values with save_checkpoint(extra=...)",
            )
    return dict(obj)


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidMetadataError("<metadata>", f"expected a dict, got a {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise InvalidMetadataError(key, f"the key is a {type(key).__name__}")
        if not isinstance(value, str):
            raise InvalidMetadataError(key, f"the value is a {type(value).__name__}")
        if key.startswith(_RESERVED_PREFIX):
            raise InvalidMetadataError(key, f"keys starting with {_RESERVED_PREFIX!r} are reserved")
    return dict(metadata)


def _view_identity(t: torch.Tensor, storage: torch.UntypedStorage | None = None) -> tuple[Any, ...]:
    """What makes two tensors the very same view of the same memory (``storage``: ``t``'s, if known)."""
    ptr = (storage if storage is not None else t.untyped_storage()).data_ptr()
    return (t.device, ptr, t.storage_offset(), t.shape, t.stride(), t.dtype)


def compact_tensors(
    state: StateDict,
    dtype: torch.dtype | None,
    *,
    stage: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[StateDict, dict[str, str]]:
    """CPU tensors that each own exactly their data, plus ``alias -> canonical`` for tied keys.

    Keys that are the very same view of the same memory (tied weights) are kept
    once and listed as aliases. Any other tensor that is a slice of a larger
    storage, non-contiguous, or shares memory with one already kept is copied,
    so the file holds exactly the tensors' data and nothing else. With
    ``stage``, every kept tensor is instead copied by ``stage(key, tensor)``
    (into a staging buffer of its own: a snapshot the caller may change after).
    """
    kept: StateDict = {}
    aliases: dict[str, str] = {}
    seen_views: dict[tuple[Any, ...], str] = {}
    used_storages: set[int] = set()
    for key, value in state.items():
        t = value.detach() if value.requires_grad else value  # state_dict() values are detached already
        if t.layout != torch.strided:
            raise NotAStateDictError(
                None, f"tensor {key!r} with layout {t.layout}", hint="convert it with .to_dense() first"
            )
        on_cpu = t.is_cpu
        if not on_cpu and t.is_meta:
            raise NotAStateDictError(
                None,
                f"tensor {key!r} on the meta device (it has no data)",
                hint="materialize the model first, e.g. model.to_empty(device='cpu') and load real weights",
            )
        storage = t.untyped_storage()
        empty = t.numel() == 0
        if not empty:
            identity = _view_identity(t, storage)
            if identity in seen_views:
                aliases[key] = seen_views[identity]
                continue
            seen_views[identity] = key
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
            storage = t.untyped_storage()
        if stage is not None:
            kept[key] = stage(key, t)
            continue
        if not on_cpu:
            t = t.to("cpu")
            storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if (
            not t.is_contiguous()
            or t.storage_offset()
            or storage.nbytes() != t.nbytes
            or ptr in used_storages
        ):  # not a tensor that owns exactly its memory
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr()
        if not empty:
            used_storages.add(ptr)
        kept[key] = t
    return kept, aliases


def save_weights(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    durable: bool = True,
    storage_options: StorageOptions | None = None,
    max_shard_size: int | str | None = None,
    trainable_only: bool = False,
) -> Path | str:
    """Save a model's weights (parameters and buffers) to one file, atomically.

    The format follows the suffix: ``.safetensors`` (recommended: no pickle,
    memory-mappable) or ``.pt`` / ``.pth`` / ``.bin`` (a ``torch.save`` zip
    holding a plain ``dict[str, Tensor]``, readable with
    ``torch.load(path, weights_only=True)``). Tied weights are stored once and
    come back tied from :func:`load_weights`; CUDA tensors are stored as plain
    data and load on any device.

    Args:
        model_or_state_dict (nn.Module | Mapping[str, Tensor]): what to save.
        path (str | PathLike): the file to write; missing folders are created.
            A URL (``s3://bucket/w.safetensors``, any fsspec protocol) is
            written to a local scratch file and uploaded in one piece.
        dtype (torch.dtype | None, default None): cast floating-point tensors to
            this dtype (e.g. ``torch.bfloat16`` halves the file); integer and
            bool tensors are never cast.
        metadata (Mapping[str, str] | None, default None): text to store with
            the weights (``torchkeep inspect`` shows it).
        durable (bool, default True): fsync before the file replaces ``path``.
        storage_options (Mapping | None, default None): options of the fsspec
            filesystem for a URL (credentials, ``endpoint_url``, …).
        max_shard_size (int | str | None, default None): write a Hugging Face
            sharded checkpoint instead, shards of at most this many bytes
            (``"5GB"``, ``"500MB"``, ``"50KB"``: 1000-based as Hugging Face
            counts; ``"2GiB"``: 1024-based). ``path`` is then the folder
            (safetensors shards), or a Hugging Face file name inside it
            naming the format (``model.safetensors[.index.json]`` or
            ``pytorch_model.bin[.index.json]`` for ``.bin`` shards). Shards are written first and
            the index last, so a crash never leaves a broken save; see
            :mod:`torchkeep.shards`.
        trainable_only (bool, default False): save only what fine-tuning
            changes: the parameters that require grad and the buffers of the
            modules owning one (a BatchNorm in a new head), for a file a small
            fraction of the model's. The metadata records the digest of the
            rest (the frozen base), which :func:`load_into` checks before
            loading the file onto a model; see :mod:`torchkeep.trainable_only`.
            Needs the ``nn.Module`` (a state dict does not say what trains)
            and one file (no ``max_shard_size``).

    Returns:
        The path written (the URL, for a URL; the folder, for shards).

    Raises:
        InvalidShardSizeError: ``max_shard_size`` is not a positive size.
        UnsupportedSuffixError: the suffix names no known format.
        NotAStateDictError: the input is not a module or a dict of tensors.
        UnsupportedDtypeError: safetensors cannot store a tensor's dtype.
        InvalidMetadataError: metadata is not ``str -> str``.
        InvalidArgumentError: ``trainable_only`` with a state dict, with
            ``max_shard_size``, or with no parameter that requires grad.

    Example:
        >>> torchkeep.save_weights(model, "model.safetensors")
        >>> torchkeep.save_weights(model, "head.safetensors", trainable_only=True)
        >>> torchkeep.save_weights(model, "gpt2-out/", max_shard_size="5GB")
    """
    record: dict[str, str] = {}
    if trainable_only:  # trainable.py decides what the file holds and records the base it leaves out
        model_or_state_dict, record = trainable_state(model_or_state_dict, max_shard_size=max_shard_size)
    if max_shard_size is not None:  # a Hugging Face sharded folder: shards.py owns that layout
        parse_shard_size(max_shard_size)  # before any work, as the suffix check is for one file
        meta = _check_metadata(metadata)
        state = to_state_dict(model_or_state_dict)
        kept, aliases = compact_tensors(state, dtype)
        return save_shards(
            resolve(path, storage_options),
            state,
            kept,
            aliases,
            meta,
            max_shard_size=max_shard_size,
            durable=durable,
            write=_write_file,
        )
    store = file_store(path, storage_options)
    target = store.public("")
    fmt = suffix_format(target if isinstance(target, Path) else Path(target.rsplit("/", 1)[-1]))
    meta = _check_metadata(metadata) | record
    state = to_state_dict(model_or_state_dict)
    kept, aliases = compact_tensors(state, dtype)
    with store.stage("", durable=durable) as tmp:
        _write(tmp, fmt, state, kept, aliases, meta)
    logger.info("saved %d tensors to %s", len(state), target)
    return target


def _write_file(
    target: Path,
    fmt: FileFormat,
    state: StateDict,
    kept: StateDict,
    aliases: dict[str, str],
    meta: dict[str, str],
    *,
    durable: bool,
) -> None:
    """:func:`_write` as one whole file at ``target``: complete or absent (what a shard needs)."""
    with atomic_target(target, durable=durable) as tmp:
        _write(tmp, fmt, state, kept, aliases, meta)


def _write(
    target: Path,
    fmt: FileFormat,
    state: StateDict,
    kept: StateDict,
    aliases: dict[str, str],
    meta: dict[str, str],
) -> None:
    """Write the file at ``target`` (a fresh path the store makes the final file once complete)."""
    if fmt is FileFormat.SAFETENSORS:
        _write_safetensors(target, kept, aliases, meta)
    else:
        ordered = {key: kept[aliases.get(key, key)] for key in state}
        _write_torch_zip(target, ordered, meta)


def _write_safetensors(target: Path, kept: StateDict, aliases: dict[str, str], meta: dict[str, str]) -> None:
    for key, t in kept.items():
        if str(t.dtype) not in _SAFETENSORS_TORCH_DTYPES:
            raise UnsupportedDtypeError(key, str(t.dtype))
    header_meta = {"format": "pt", **meta}
    if aliases:
        header_meta[_ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_safetensors(fd, kept, header_meta)
    finally:
        os.close(fd)


def _write_torch_zip(target: Path, state: StateDict, meta: dict[str, str]) -> None:
    # An extra zip record holds the metadata: torch.load ignores it, torchkeep reads it back.
    # (the store's temporary path has the final name: so has the zip's root)
    records = {_PT_METADATA_RECORD: json.dumps(meta, sort_keys=True).encode()} if meta else {}
    save_torch_zip(target, state, records=records)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The text metadata stored with a weights file (empty if none).

    Args:
        path (str | PathLike): a file written by :func:`save_weights` or any
            safetensors file (its ``__metadata__``).

    Returns:
        ``dict[str, str]``, without torchkeep's own bookkeeping entries.

    Example:
        >>> torchkeep.read_metadata("model.safetensors")
        {'format': 'pt', 'dataset': 'digits'}
    """
    fmt = detect_format(path)
    if fmt is FileFormat.SAFETENSORS:
        meta = read_safetensors_header(path).metadata
        return {k: v for k, v in meta.items() if not k.startswith(_RESERVED_PREFIX)}
    if fmt is FileFormat.TORCH_ZIP:
        return _read_pt_metadata(Path(path))
    return {}


def _read_pt_metadata(path: Path) -> dict[str, str]:
    with path.open("rb") as f:
        archive = ZipArchive(path, f, os.fstat(f.fileno()).st_size, limits=DEFAULT_LIMITS)
        meta = read_metadata_record(archive, torch_prefix(archive), DEFAULT_LIMITS)
    return {k: v for k, v in meta.items() if not k.startswith(_RESERVED_PREFIX)}


def read_torch_file(
    path: Path,
    *,
    map_location: MapLocation | None,
    mmap: bool = False,
    trust: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> Any:
    """Read a ``torch.save`` file: with torchkeep's allowlist reader, or ``torch.load`` on trust.

    Without ``trust`` nothing is unpickled: :func:`torchkeep.safety.load_torch_file`
    builds the result, and no error ever falls back to ``torch.load``.

    Raises:
        UnsafeFileError: the file needs objects outside the allowlist (all
            of them are named), or is built to fool readers.
        LimitExceededError: the file asks for more than ``limits`` allow.
        MissingClassError: (``trust``) the pickle names a class that is not importable.
        CorruptFileError: the file is damaged.
    """
    if not trust:
        try:
            return load_torch_file(path, map_location=map_location, mmap=mmap, limits=limits)
        except UnsafeFileError as err:
            if not err.globals:
                raise
            names = [f.detail for f in scan(path, limits=limits).findings if f.kind == "import"]
            raise UnsafeFileError(
                path, names or err.globals, member=err.member, offset=err.offset, opcode=err.opcode
            ) from None
    logger.warning("unpickling %s with trust=True: this runs code named in the file", path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except (ModuleNotFoundError, AttributeError) as err:
        raise MissingClassError(path, err) from err
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise CorruptFileError(path, first_line(err)) from err


def _is_tensor_dict(obj: object) -> TypeGuard[Mapping[str, torch.Tensor]]:
    return (
        isinstance(obj, Mapping)
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _describe(obj: object) -> str:
    if isinstance(obj, Mapping):
        return f"a dict of {len(obj)} entries"
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {list(obj.shape)}"
    return f"a {type(obj).__name__}"


def extract_state_dict(obj: object, *, path: Path | None, key: str | None) -> StateDict:
    """Find the state dict inside what a file held: the object itself or a known entry."""
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = [str(k) for k in obj] if isinstance(obj, Mapping) else []
            raise NotAStateDictError(path, f"no entry {key!r}", keys=keys)
        obj = obj[key]
        if not _is_tensor_dict(obj):
            raise NotAStateDictError(path, f"under {key!r} {_describe(obj)} that is not all tensors")
        return dict(obj)
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for candidate in _STATE_DICT_KEYS:
            if candidate in obj and _is_tensor_dict(obj[candidate]):
                logger.info("using the state dict under %r", candidate)
                return dict(obj[candidate])
        raise NotAStateDictError(path, _describe(obj), keys=[str(k) for k in obj])
    raise NotAStateDictError(path, _describe(obj))


def restore_aliases(tensors: StateDict, metadata: Mapping[str, object], path: Path) -> StateDict:
    """Add the tied keys ``save_weights`` stored once, as checked by ``safety.aliases.check_aliases``."""
    aliases = check_aliases(path, tensors.keys(), metadata)
    restored = dict(tensors)
    for alias, canonical in aliases.items():
        restored[alias] = tensors[canonical]
    return restored


def load_weights(
    path: str | os.PathLike[str],
    *,
    map_location: MapLocation = "cpu",
    key: str | None = None,
    trust: bool = False,
    mmap: bool | None = None,
    dtype: torch.dtype | None = None,
    limits: Limits = DEFAULT_LIMITS,
    storage_options: StorageOptions | None = None,
) -> StateDict:
    """Load a state dict from any weights file, without running code from it.

    Reads safetensors, ``torch.save`` files (zip and legacy) holding a state
    dict or a checkpoint dict (the weights are found under ``state_dict``,
    ``model_state_dict`` or ``model``, or under ``key``), Hugging Face
    ``pytorch_model.bin`` files, Hugging Face model folders and sharded
    checkpoints (``model.safetensors.index.json`` + shards, or the ``.bin``
    ones: each shard read and checked as a single file is, the index
    checked strictly), and the weights of a ``.pt2`` program.

    Args:
        path (str | PathLike): the file, a Hugging Face model folder (or PEFT
            adapter folder), a shard index (``*.index.json``), or a URL
            (``s3://…``, any fsspec protocol: downloaded to a local scratch
            file, then read).
        map_location (str | torch.device, default "cpu"): where the tensors
            go. The default loads files saved on a GPU on any machine.
        key (str | None, default None): the entry of a checkpoint dict that
            holds the weights, when it is not one of the usual names (for
            ``torch.save`` files).
        trust (bool, default False): allow unpickling any object from a
            ``torch.save`` file (a pickled model gives its state dict). This
            runs code named in the file: only for files you trust.
        mmap (bool | None, default None): True maps the file: returns at
            once, pages are read on first use, and a tensor for another device
            is copied from the mapping straight to it (for ``torch.save``
            files the records' CRCs are then not checked). False reads all
            tensor data into one buffer with a few large reads. None: mapped
            for safetensors, read (and CRC-checked) for ``torch.save`` files;
            read for a URL (the scratch copy is deleted at once).
        dtype (torch.dtype | None, default None): cast floating-point tensors
            to this dtype (integer and bool tensors are kept). With a mapped
            file each tensor is converted on its way from the mapping, so no
            second full copy is held in host memory; tied weights stay tied.
        limits (Limits, default Limits()): bounds on what the file may ask
            for (bytes, tensors, elements, nesting), checked before allocating.
        storage_options (Mapping | None, default None): options of the fsspec
            filesystem for a URL (credentials, ``endpoint_url``, …).

    Returns:
        ``dict[str, Tensor]``; tied weights come back as the same tensor.

    Raises:
        ModelFileNotFoundError, PathIsDirectoryError: no file at ``path``.
        CorruptFileError: the file is empty, truncated or damaged.
        UnknownFormatError: the file is not a model file.
        NotAStateDictError: the file holds no state dict (try ``key=``).
        UnsafeFileError: the file would import or call something outside
            the allowlist (a pickle of arbitrary objects) and ``trust`` is
            False, or it is built to fool readers; nothing was unpickled.
        LimitExceededError: the file asks for more than ``limits`` allow.

    Example:
        >>> sd = torchkeep.load_weights("pytorch_model.bin")
    """
    from torchkeep.consolidate import is_checkpoint_folder, read_checkpoint_weights
    from torchkeep.run.reader import open_local

    store = file_store(path, storage_options)
    with open_local(path, storage_options) as local:
        if local.is_dir() and is_checkpoint_folder(local):  # or a run folder: its newest valid checkpoint
            state = {k: v.to(map_location) for k, v in read_checkpoint_weights(local).items()}
        else:
            mapped = mmap if store.in_place else bool(mmap)  # a downloaded copy is read, then deleted
            state = _read_weights(local, map_location, key, trust, mapped, limits)
    return state if dtype is None else cast_floating(state, dtype)


def cast_floating(state: StateDict, dtype: torch.dtype) -> StateDict:
    """``state`` with floating-point tensors cast to ``dtype``; tensors shared by keys stay shared."""
    done: dict[int, torch.Tensor] = {}
    out: StateDict = {}
    for key, value in state.items():
        if not value.is_floating_point() or value.dtype == dtype:
            out[key] = value
            continue
        if id(value) not in done:
            done[id(value)] = value.to(dtype)
        out[key] = done[id(value)]
    return out


def _read_weights(
    p: Path, map_location: MapLocation, key: str | None, trust: bool, mmap: bool | None, limits: Limits
) -> StateDict:
    hf = find_hf_weights(p, limits=limits)  # a Hugging Face folder or shard index: each file read as below
    if hf is not None:
        return read_hf_weights(
            hf, lambda f, lim: _read_weights(f, map_location, key, trust, mmap, lim), limits=limits
        )
    fmt = detect_format(p)
    if fmt is FileFormat.SAFETENSORS:
        header = read_safetensors_header(p, limits=limits)
        total = sum(t.nbytes for t in header.tensors)
        if total > limits.max_bytes:
            raise LimitExceededError(p, "max_bytes", total, limits.max_bytes, what="tensor data")
        try:
            tensors = read_safetensors(p, header, device=torch.device(map_location), mmap=mmap is not False)
        except (OSError, EOFError) as err:
            raise CorruptFileError(p, f"reading the tensor data failed ({err})") from err
        return extract_state_dict(restore_aliases(tensors, header.metadata, p), path=p, key=None)
    if fmt is FileFormat.TORCH_EXPORT:
        from torchkeep.models import load_exported

        program = load_exported(p, trust=trust, limits=limits)
        return {k: v.to(map_location) for k, v in program.state_dict.items()}
    obj = read_torch_file(p, map_location=map_location, trust=trust, mmap=bool(mmap), limits=limits)
    if trust and isinstance(obj, nn.Module):
        return to_state_dict(obj)
    return extract_state_dict(obj, path=p, key=key)

"""Trainable-only weight files: what a fine-tune changed, and the frozen base it was trained on.

``save_weights(model, path, trainable_only=True)`` writes every parameter that
requires grad, plus the buffers of each module that owns such a parameter
itself (a BatchNorm in a new head keeps its running statistics with it).
Everything else is *the base*: the file names it by the digest of each base
tensor (:func:`torchkeep.storage.digests.tensor_digest`) and one digest over
them all (:func:`~torchkeep.storage.digests.state_digest`), in its metadata::

    torchkeep.trainable_only  "1"
    torchkeep.base_tensors    how many base tensors ("120")
    torchkeep.base_digest     state_digest({name: tensor_digest(t) for the base})
    torchkeep.base_index      JSON {name: tensor_digest(t)} of the base

``load_into`` reads this record back (:func:`read_base_record`), expects only
the file's own keys from it, and checks the model's base against the record
(:func:`compare_base`) before changing the model. Names are the model's
state-dict names (``module.`` of DDP and ``_orig_mod.`` of ``torch.compile``
included), which ``load_into`` pairs with another model's as it pairs any keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from torchkeep.errors import BaseMismatchError, CorruptFileError, InvalidArgumentError, NotAStateDictError
from torchkeep.formats import FileFormat, detect_format, read_safetensors_header
from torchkeep.safety import DEFAULT_LIMITS, Limits
from torchkeep.safety.torchfile import read_metadata_record, torch_prefix
from torchkeep.safety.ziparchive import ZipArchive
from torchkeep.storage.digests import is_digest, state_digest, tensor_digest

__all__ = [
    "BASE_DIGEST_KEY",
    "BASE_INDEX_KEY",
    "BASE_TENSORS_KEY",
    "TRAINABLE_KEY",
    "BaseRecord",
    "base_digests",
    "compare_base",
    "read_base_record",
    "shown_metadata",
    "trainable_keys",
    "trainable_state",
]

TRAINABLE_KEY = "torchkeep.trainable_only"
BASE_TENSORS_KEY = "torchkeep.base_tensors"
BASE_DIGEST_KEY = "torchkeep.base_digest"
BASE_INDEX_KEY = "torchkeep.base_index"
# the digest a tensor without data (on the meta device) is given: no real digest equals it
_NO_DATA = "meta"


@dataclass(frozen=True)
class BaseRecord:
    """The base a trainable-only file was saved on, as its metadata records it.

    Attributes:
        tensors: how many base tensors there were.
        digest: ``state_digest(index)``.
        index: ``name -> tensor_digest`` of each base tensor, in state-dict order.
    """

    tensors: int
    digest: str
    index: dict[str, str]


def trainable_keys(model: nn.Module) -> list[str]:
    """The state-dict names a trainable-only file holds, in state-dict order.

    Every parameter with ``requires_grad``, and every buffer of a module that
    owns such a parameter directly (not through a child).

    Example:
        >>> torchkeep.freeze(model); torchkeep.unfreeze(model, "fc")
        >>> trainable_keys(model)
        ['fc.weight', 'fc.bias']
    """
    selected: set[str] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        trains = [
            name
            for name, param in module.named_parameters(recurse=False, remove_duplicate=False)
            if param.requires_grad
        ]
        if trains:
            selected.update(dot + name for name in trains)
            selected.update(
                dot + name for name, _ in module.named_buffers(recurse=False, remove_duplicate=False)
            )
    return [key for key in model.state_dict() if key in selected]


def base_digests(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``name -> tensor_digest`` of each tensor; a tensor on the meta device (no data) gets ``"meta"``."""
    return {
        name: _NO_DATA if tensor.device.type == "meta" else tensor_digest(tensor)
        for name, tensor in state.items()
    }


def trainable_state(
    model: object, *, max_shard_size: object = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What ``save_weights(..., trainable_only=True)`` writes: the tensors, and the base record.

    Args:
        model: what the caller passed to ``save_weights``.
        max_shard_size: ``save_weights``'s: a sharded save, which is refused.

    Returns:
        ``(state, metadata)``: the trainable tensors, and the record's
        ``torchkeep.*`` entries to merge into the file's metadata.

    Raises:
        InvalidArgumentError: ``model`` is not an ``nn.Module``, no parameter
            requires grad, or a sharded save was asked for.
        NotAStateDictError: a base tensor is on the meta device (it has no data to digest).
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            "trainable_only",
            True,
            f"needs the model itself, and got a {type(model).__name__}: a state dict does not say "
            "which tensors train (buffers have no requires_grad)",
            "pass the nn.Module, e.g. save_weights(model, 'head.safetensors', trainable_only=True)",
        )
    if max_shard_size is not None:
        raise InvalidArgumentError(
            "max_shard_size",
            max_shard_size,
            "cannot split a trainable-only file (its base record lives in one file's metadata)",
            "drop max_shard_size to write one file, or save everything with trainable_only=False",
        )
    name = type(model).__name__
    if not any(param.requires_grad for param in model.parameters()):
        raise InvalidArgumentError(
            "trainable_only",
            True,
            f"selects nothing: no parameter of {name} requires grad, so nothing trains",
            "unfreeze what you fine-tune first (e.g. torchkeep.unfreeze(model, 'fc')), "
            "or save every tensor with trainable_only=False",
        )
    state = dict(model.state_dict())
    keep = set(trainable_keys(model))
    base = {key: value for key, value in state.items() if key not in keep}
    for key, value in base.items():
        if value.device.type == "meta":
            raise NotAStateDictError(
                None,
                f"base tensor {key!r} on the meta device (it has no data to record the base by)",
                hint="materialize the model first, e.g. model.to_empty(device='cpu') and load real weights",
            )
    index = base_digests(base)
    metadata = {
        TRAINABLE_KEY: "1",
        BASE_TENSORS_KEY: str(len(index)),
        BASE_DIGEST_KEY: state_digest(index),
        BASE_INDEX_KEY: json.dumps(index),
    }
    return {key: value for key, value in state.items() if key in keep}, metadata


def _raw_metadata(path: Path, limits: Limits) -> dict[str, str]:
    """All of a weights file's text metadata, torchkeep's own entries included (empty if none)."""
    if not path.is_file():
        return {}
    fmt = detect_format(path)
    if fmt is FileFormat.SAFETENSORS:
        return dict(read_safetensors_header(path, limits=limits).metadata)
    if fmt is FileFormat.TORCH_ZIP:
        with path.open("rb") as f:
            archive = ZipArchive(path, f, os.fstat(f.fileno()).st_size, limits=limits)
            return read_metadata_record(archive, torch_prefix(archive), limits)
    return {}


def shown_metadata(path: Path) -> dict[str, str]:
    """The base record's entries worth showing (``torchkeep inspect``): flag, count and digest."""
    raw = _raw_metadata(path, DEFAULT_LIMITS)
    return {key: raw[key] for key in (TRAINABLE_KEY, BASE_TENSORS_KEY, BASE_DIGEST_KEY) if key in raw}


def read_base_record(path: Path, *, limits: Limits = DEFAULT_LIMITS) -> BaseRecord | None:
    """The base record of a trainable-only file; None for any other file or folder.

    Raises:
        CorruptFileError: the record is incomplete or does not agree with itself.
    """
    meta = _raw_metadata(path, limits)
    flag = meta.get(TRAINABLE_KEY)
    if flag is None:
        return None

    def corrupt(reason: str) -> CorruptFileError:
        return CorruptFileError(
            path,
            f"the trainable-only record is damaged: {reason}; save the file again with "
            "save_weights(model, path, trainable_only=True)",
        )

    if flag != "1":
        raise corrupt(f"{TRAINABLE_KEY!r} is {flag!r}, not '1'")
    count, digest, raw_index = (meta.get(k) for k in (BASE_TENSORS_KEY, BASE_DIGEST_KEY, BASE_INDEX_KEY))
    if count is None or not count.isdigit() or not count.isascii():
        raise corrupt(f"{BASE_TENSORS_KEY!r} is {count!r}, not a count")
    if not isinstance(digest, str) or not is_digest(digest):
        raise corrupt(f"{BASE_DIGEST_KEY!r} is {digest!r}, not a digest")
    try:
        index = json.loads(raw_index) if raw_index is not None else None
    except (ValueError, RecursionError):
        index = None
    if not isinstance(index, dict) or not all(
        isinstance(k, str) and (is_digest(v) or v == _NO_DATA) for k, v in index.items()
    ):
        raise corrupt(f"{BASE_INDEX_KEY!r} is not a JSON object of names to digests")
    if len(index) != int(count) or state_digest(index) != digest:
        raise corrupt(f"{BASE_INDEX_KEY!r} does not agree with {BASE_TENSORS_KEY!r} and {BASE_DIGEST_KEY!r}")
    return BaseRecord(int(count), digest, index)


def compare_base(
    record: BaseRecord, model_state: Mapping[str, torch.Tensor], base_pairs: Mapping[str, str], *, path: str
) -> None:
    """Raise when the model's base tensors are not the ones the file was trained on.

    Args:
        record: the file's base record.
        model_state: the model's state dict.
        base_pairs: ``file name -> model key`` for every name of ``record.index``.
        path: the file, for the message.

    Raises:
        BaseMismatchError: a base tensor differs (values, dtype or shape).
    """
    found = base_digests({name: model_state[base_pairs[name]] for name in record.index})
    differing = [name for name, digest in record.index.items() if found[name] != digest]
    if differing:
        raise BaseMismatchError(
            path,
            expected=record.digest,
            found=state_digest(found),
            differing=differing,
            base_tensors=record.tensors,
        )

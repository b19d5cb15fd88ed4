"""Capture and apply a training state: what goes into which file of a step folder.

:func:`capture` takes a consistent snapshot of model, optimizer, scheduler,
scaler, user stateful objects, extras and random states (per rank in a
distributed job) as the files of a step folder (:attr:`Snapshot.files`);
:func:`apply_checkpoint` puts a checkpoint folder's state back into live
objects after checking that everything fits. The model's weights go to
``model.safetensors`` under their own names, every other tensor to
``state.safetensors``, everything else to ``state.json``; DTensor-sharded
model and optimizer state travels through DCP (:mod:`torchkeep.distributed`).
Adding a file to a step folder is a change here (and its name in
:mod:`torchkeep.run.layout`).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkeep.checkpoint import CheckpointInfo, Stateful
from torchkeep.distributed import (
    Coordinator,
    is_sharded,
    load_sharded,
    sharded_state,
    unwrap,
)
from torchkeep.errors import CheckpointMismatchError, RngRestoreWarning
from torchkeep.restoring import apply_states, check_states
from torchkeep.rng import capture_rng_state, restore_rng_state
from torchkeep.run.blobs import VersionToken, read_indexed_files, version_token
from torchkeep.run.layout import (
    FORMAT_VERSION,
    MODEL,
    MODEL_ALIASES,
    SHARD_MODEL,
    STATE,
    STATE_TENSORS,
    V1_MODEL,
    V1_TENSORS,
)
from torchkeep.serialize import flatten, unflatten
from torchkeep.weights import MapLocation, compact_tensors, load_weights, restore_aliases, to_state_dict

__all__ = [
    "JsonFile",
    "Snapshot",
    "TensorFile",
    "apply_checkpoint",
    "capture",
    "model_weights",
    "read_state",
]

logger = logging.getLogger(__name__)

_STATE_KEYS = {
    "step",
    "epoch",
    "metrics",
    "extra",
    "model",
    "aliases",
    "parts",
    "rng",
    "versions",
    "world",
    "sharded",
}
Stage = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TensorFile:
    """A safetensors file of a step folder: its tensors, header metadata, and whether to check them.

    ``versions`` (only with ``Checkpointer(trust_version_counters=True)``)
    holds, for frozen parameters, torch's version token of the live tensor
    and its storage, so an unchanged one need not be read again. ``known``
    names tensors of the file already stored in the run's packs (by digest)
    and no longer in ``tensors``.
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    check_finite: bool = False
    versions: dict[str, tuple[VersionToken, torch.UntypedStorage]] | None = None
    known: dict[str, str] = field(default_factory=dict)  # key -> digest of tensors stored already


@dataclass(frozen=True)
class JsonFile:
    """A JSON file of a step folder."""

    data: dict[str, Any]


@dataclass
class Snapshot:
    """One rank's part of a checkpoint, ready to write.

    Attributes:
        step: the step.
        epoch: the epoch, if given.
        metrics: the metrics, as floats (``None`` for non-numbers).
        files: the files rank 0 writes, by name (empty on other ranks).
        shards: the DTensor-sharded tensors for DCP (every rank), or ``None``.
    """

    step: int
    epoch: int | None
    metrics: dict[str, float | None]
    files: dict[str, TensorFile | JsonFile]
    shards: dict[str, torch.Tensor] | None

    def staged_keys(self) -> set[str]:
        """The staging-buffer keys this snapshot uses (see :func:`capture`'s ``stage``)."""
        keys = {
            f"{name}:{key}"
            for name, f in self.files.items()
            if isinstance(f, TensorFile)
            for key in f.tensors
        }
        return keys | set(self.shards or ())


def _stage_shards(shards: dict[str, Any], stage: Stage) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    out: dict[str, Any] = {}
    for key, value in shards.items():
        if isinstance(value, DTensor):
            local = stage(key, value.to_local())
            out[key] = DTensor.from_local(
                local,
                value.device_mesh,
                value.placements,
                run_check=False,
                shape=value.shape,
                stride=value.stride(),
            )
        else:
            out[key] = stage(key, value.detach())
    return out


def capture(
    step: int,
    *,
    model: nn.Module,
    objects: Mapping[str, Stateful | None],
    epoch: int | None,
    metrics: dict[str, float | None],
    extra: Mapping[str, Any] | None,
    coordinator: Coordinator,
    stage: Stage | None,
    track_versions: bool = False,
) -> Snapshot:
    """Snapshot a training state (``stage`` copies every tensor into a buffer of its own).

    ``objects`` holds ``optimizer``, ``scheduler``, ``scaler`` and user
    stateful objects by name. Collective in a distributed job. With
    ``track_versions``, the model file records torch's version token of each
    frozen parameter (see :class:`TensorFile`).

    Raises:
        UnserializableValueError: a value that cannot be stored without pickle.
        DistributedSaveError: any rank failed.
    """
    module = unwrap(model)
    main = coordinator.is_main
    snap = Snapshot(step, epoch, metrics, {}, None)
    tensors: dict[str, torch.Tensor] = {}
    model_tensors: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}

    def local() -> dict[str, Any]:
        """This rank's part; returns its random state."""
        rng = capture_rng_state()
        model_state = to_state_dict(module)
        sharded = is_sharded(model_state)
        if sharded and not coordinator.active:
            raise ValueError(
                "the model's state is sharded (DTensor, e.g. FSDP2) and this Checkpointer does not "
                "coordinate the ranks; call save() on every rank with Checkpointer(distributed=None)"
            )
        parts: dict[str, Any] = {}
        rest = {name: obj for name, obj in objects.items() if obj is not None}
        if sharded:
            shard_tensors: dict[str, torch.Tensor] = {}
            model_sd, optim_sd = sharded_state(module, rest.pop("optimizer", None))
            for key, value in model_sd.items():
                shard_tensors[f"{SHARD_MODEL}{key}"] = value
            model_keys = list(model_sd)
            if optim_sd is not None:
                parts["optimizer"] = flatten(optim_sd, "optimizer", shard_tensors)
            snap.shards = shard_tensors if stage is None else _stage_shards(shard_tensors, stage)
        else:
            model_keys = list(model_state)
            if main:
                model_tensors.update(model_state)
        if main:  # replicated state: written once, by rank 0
            parts.update({name: flatten(obj.state_dict(), name, tensors) for name, obj in rest.items()})
            state.update(
                {
                    "step": step,
                    "epoch": epoch,
                    "metrics": metrics,
                    "extra": flatten(dict(extra or {}), "extra", tensors),
                    "model": model_keys,
                    "parts": parts,
                    "versions": {"torch": str(torch.__version__), "format": FORMAT_VERSION},
                }
            )
            if sharded:
                state["sharded"] = True
        return rng

    # every rank must hear of a failure before any rank writes
    rng = coordinator.attempt(local, step=step, stage="snapshot")
    ranks = coordinator.gather(rng)
    if main:

        def staged(file: str) -> Stage | None:
            return None if stage is None else (lambda key, t: stage(f"{file}:{key}", t))

        kept_model, model_aliases = compact_tensors(model_tensors, None, stage=staged(MODEL))
        kept, aliases = compact_tensors(tensors, None, stage=staged(STATE_TENSORS))
        state["rng"] = flatten(ranks[0], "rng", kept)
        if coordinator.size > 1:
            state["world"] = {
                "size": coordinator.size,
                "rng": {str(r): flatten(ranks[r], f"rng@{r}", kept) for r in range(1, coordinator.size)},
            }
        state["aliases"] = aliases
        if not state.get("sharded"):
            model_meta = {"format": "pt"}
            if model_aliases:
                model_meta[MODEL_ALIASES] = json.dumps(model_aliases, sort_keys=True)
            versions = _frozen_versions(module, model_tensors, kept_model) if track_versions else None
            snap.files[MODEL] = TensorFile(kept_model, model_meta, check_finite=True, versions=versions)
        snap.files[STATE_TENSORS] = TensorFile(kept, {"format": "pt"})
        snap.files[STATE] = JsonFile(state)
    return snap


def _frozen_versions(
    module: nn.Module, live: Mapping[str, torch.Tensor], kept: Mapping[str, torch.Tensor]
) -> dict[str, tuple[VersionToken, torch.UntypedStorage]]:
    """Version tokens of the frozen parameters among ``kept`` (buffers are never trusted: kernels
    such as BatchNorm's update their running statistics without counting a version)."""
    versions = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if p.requires_grad or name not in kept or p.is_meta:
            continue
        t = live[name]
        storage = t.untyped_storage()
        versions[name] = (version_token(t, storage), storage)
    return versions


def read_state(folder: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint folder, checked for entries this version does not know.

    Raises:
        CheckpointMismatchError: it holds unknown entries (a newer torchkeep wrote it).
    """
    with (folder / STATE).open(encoding="utf-8") as f:
        state: dict[str, Any] = json.load(f)
    unknown = set(state) - _STATE_KEYS
    if unknown:
        raise CheckpointMismatchError(
            folder,
            "checkpoint",
            f"state.json holds entries this torchkeep does not know: {sorted(unknown)}",
            "upgrade torchkeep (pip install -U torchkeep), which wrote this checkpoint",
        )
    return state


def _read_tensors(
    folder: Path, state: dict[str, Any], map_location: MapLocation
) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
    """The model's weights (``None`` when sharded) and the other tensors, of either version."""
    from safetensors.torch import load_file

    device = str(torch.device(map_location))
    files = read_indexed_files(folder, (MODEL, STATE_TENSORS), device=torch.device(device))
    indexed = files.get(STATE_TENSORS)
    v1 = indexed is None and (folder / V1_TENSORS).is_file()
    if indexed is not None:
        tensors = indexed[0]
    else:
        tensors = load_file(str(folder / (V1_TENSORS if v1 else STATE_TENSORS)), device=device)
    for alias, canonical in state["aliases"].items():
        tensors[alias] = tensors[canonical]
    if state.get("sharded"):
        return None, tensors
    if v1:
        return {key: tensors[f"{V1_MODEL}{key}"] for key in state["model"]}, tensors
    model = files.get(MODEL)
    if model is not None:
        weights = restore_aliases(*model, folder / MODEL)
    else:
        weights = load_weights(folder / MODEL, map_location=map_location)  # ties restored from its metadata
    return {key: weights[key] for key in state["model"]}, tensors


def model_weights(folder: Path) -> dict[str, torch.Tensor] | None:
    """The model's weights of a verified step folder, tied ones restored; ``None`` when sharded."""
    state = read_state(folder)
    model_state, _ = _read_tensors(folder, state, "cpu")
    return model_state


def _restore_rngs(
    state: dict[str, Any], tensors: Mapping[str, torch.Tensor], coordinator: Coordinator
) -> None:
    world = state.get("world") or {"size": 1, "rng": {}}
    saved_size = int(world["size"])
    rank = coordinator.rank
    if rank == 0:
        restore_rng_state(unflatten(state["rng"], tensors))
    elif str(rank) in world["rng"]:
        restore_rng_state(unflatten(world["rng"][str(rank)], tensors))
    else:
        warnings.warn(
            f"rank {rank}: the checkpoint was saved by {saved_size} rank(s) and holds no random state for "
            "this rank, which keeps its current one; random numbers drawn here will differ from a run "
            "that never stopped",
            RngRestoreWarning,
            stacklevel=4,
        )
    if coordinator.is_main and coordinator.size < saved_size:
        warnings.warn(
            f"the checkpoint was saved by {saved_size} ranks and is restored on {coordinator.size}: the "
            f"random states of ranks {list(range(coordinator.size, saved_size))} were not restored",
            RngRestoreWarning,
            stacklevel=4,
        )


def apply_checkpoint(
    folder: Path,
    given: dict[str, Any],
    *,
    restore_rng: bool,
    strict: bool,
    map_location: MapLocation,
    coordinator: Coordinator,
) -> CheckpointInfo:
    """Put the state of a verified checkpoint folder into the ``given`` objects (by name).

    Raises:
        CheckpointMismatchError, KeyMismatchError: it does not fit the objects given.
    """
    state = read_state(folder)
    model_state, tensors = _read_tensors(folder, state, map_location)
    sharded = bool(state.get("sharded"))
    parts: dict[str, Any] = {}
    if model_state is not None:
        parts["model"] = model_state
    for name, data in state["parts"].items():
        if not (sharded and name == "optimizer"):  # a sharded optimizer's tensors are in the shards
            parts[name] = unflatten(data, tensors)
    requested = {name: obj for name, obj in given.items() if obj is not None}
    if "model" in requested and not sharded:
        requested["model"] = unwrap(requested["model"])
    report = None
    if sharded:
        model, optimizer = requested.pop("model", None), requested.pop("optimizer", None)
        names = ["model", "optimizer", *parts]
        for name in requested:  # every check before the first object changes
            if parts.get(name) is None:
                raise CheckpointMismatchError(
                    folder,
                    name,
                    f"the checkpoint holds no {name} state (it has: {', '.join(names)})",
                    f"restore without {name}=",
                )
        check_states(folder, parts, requested, available=sorted(names))  # before the shards load
        restored = load_sharded(folder, state, model, optimizer, strict=strict, coordinator=coordinator)
        more, _ = apply_states(folder, parts, requested, strict=strict, available=sorted(names))
        restored += more
    else:
        restored, report = apply_states(folder, parts, requested, strict=strict, available=sorted(parts))
    if restore_rng:
        _restore_rngs(state, tensors, coordinator)
        restored.append("rng")
    logger.info("restored %s from %s", ", ".join(restored), folder)
    return CheckpointInfo(
        path=folder,
        epoch=state.get("epoch"),
        step=state.get("step"),
        loss=state["metrics"].get("loss"),
        metrics=dict(state["metrics"]),
        extra=unflatten(state["extra"], tensors),
        restored=tuple(restored),
        layout="torchkeep",
        model_report=report,
    )

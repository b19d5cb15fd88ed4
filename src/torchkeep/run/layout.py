"""The run-folder format: every name, version and manifest field, once.

A run folder (version 3)::

    runs/exp1/
      .writer.lock              the writer's lock (local runs; readers ignore it)
      .writer-lease.json        the writer's lease (object stores; readers ignore it)
      blobs/                    tensor data, each distinct tensor stored once
        step-00000120-3fa9c2d1.safetensors
                                a pack: the tensors first stored by that save, keyed
                                by content digest (storage/digests.py)
      step-00000120/            one committed checkpoint (incremental, the default)
        tensors.json            the index: for each tensor file of the checkpoint
                                (model.safetensors, state.safetensors), its tensors'
                                content digests and header metadata, and the pack
                                holding each digest
        state.json              everything else, pointing into state.safetensors
        manifest.json           written last: size and digest of each file, size of
                                each pack the checkpoint uses, metrics, and the
                                non-finite tensors/metrics found at save
      step-00000130/            a standalone checkpoint (Checkpointer(incremental=False),
                                ``torchkeep export-step``, or written by version 2)
        model.safetensors       the model's weights, under the model's own key names;
                                tied weights stored once (metadata "torchkeep.aliases")
        state.safetensors       every other tensor: optimizer state, RNG states, extras
        state.json, manifest.json
      step-00000140/            a sharded (FSDP2/DTensor) checkpoint
        shards/                 model and optimizer through torch.distributed.checkpoint
        tensors.json (or state.safetensors), state.json, manifest.json

A checkpoint's tensor files are either in its folder (standalone) or named by
``tensors.json`` (incremental); every reader sees the same tensors either way
(:mod:`torchkeep.run.blobs` owns the packs and the index). Version 2 wrote
only standalone folders; version 1 kept all tensors in ``tensors.safetensors``,
the model's under ``model/``-prefixed keys, with tied-weight aliases in
``state.json``. Both are still read (:data:`READABLE`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from torchkeep.storage.manifest import MANIFEST

__all__ = [
    "BLOBS",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "MODEL",
    "MODEL_ALIASES",
    "READABLE",
    "SHARDS",
    "SHARD_MODEL",
    "STATE",
    "STATE_TENSORS",
    "STEP_NAME",
    "TENSOR_INDEX",
    "V1_MODEL",
    "V1_TENSORS",
    "WRITER_LEASE",
    "WRITER_LOCK",
    "is_step",
    "manifest_version",
    "new_manifest",
    "nonfinite_of",
    "step_name",
    "step_of",
]

FORMAT = "torchkeep.checkpoint"
FORMAT_VERSION = 3
READABLE = (1, 2, 3)

MODEL = "model.safetensors"
STATE_TENSORS = "state.safetensors"
STATE = "state.json"
TENSOR_INDEX = "tensors.json"  # an incremental checkpoint's index of its tensors
BLOBS = "blobs"  # the run's packs of tensor data, shared by its checkpoints
SHARDS = "shards"  # the DCP folder of a sharded checkpoint
SHARD_MODEL = "model/"  # the prefix of the model's keys among the DCP shards (every version)
MODEL_ALIASES = "torchkeep.aliases"  # the metadata key save_weights uses too, so load_weights ties them
V1_TENSORS = "tensors.safetensors"
V1_MODEL = "model/"  # the prefix of the model's keys in a version-1 tensors.safetensors

WRITER_LOCK = ".writer.lock"
WRITER_LEASE = ".writer-lease.json"

STEP_NAME = re.compile(r"^step-(\d{8,})$")
_NONFINITE = "nonfinite"


def step_name(step: int) -> str:
    """The folder name of ``step``'s checkpoint (``step-00000120``)."""
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder name, or ``None`` if it is not one."""
    match = STEP_NAME.match(name)
    return int(match.group(1)) if match else None


def is_step(name: str) -> bool:
    """Whether ``name`` is a checkpoint folder's name."""
    return STEP_NAME.match(name) is not None


def new_manifest(
    *,
    step: int,
    epoch: int | None,
    metrics: Mapping[str, float | None],
    world_size: int,
    files: Mapping[str, Any],
    nonfinite: Mapping[str, list[str]] | None = None,
    blobs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a new checkpoint (version :data:`FORMAT_VERSION`).

    ``blobs`` maps each pack the checkpoint uses (``blobs/<name>``, relative
    to the run folder) to ``{"size": bytes}``.
    """
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "epoch": epoch,
        "metrics": dict(metrics),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "world_size": world_size,
        "files": dict(sorted(files.items())),
    }
    if blobs:
        manifest[BLOBS] = dict(sorted(blobs.items()))
    if nonfinite and any(nonfinite.values()):
        manifest[_NONFINITE] = {kind: list(names) for kind, names in nonfinite.items() if names}
    return manifest


def manifest_version(manifest: Mapping[str, Any]) -> int | None:
    """The format version of a torchkeep manifest, or ``None`` if it is not one."""
    version = manifest.get("format_version")
    if manifest.get("format") != FORMAT or not isinstance(version, int) or isinstance(version, bool):
        return None
    return version


def nonfinite_of(manifest: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{"tensors": [...], "metrics": [...]}`` holding NaN/Inf at save (empty when clean)."""
    found = manifest.get(_NONFINITE)
    if not isinstance(found, dict):
        return {}
    return {str(k): [str(n) for n in v] for k, v in found.items() if isinstance(v, list) and v}

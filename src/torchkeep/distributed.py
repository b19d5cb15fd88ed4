"""Checkpoints of a ``torch.distributed`` job: coordination of ranks and sharded state through DCP.

torchkeep rides on ``torch.distributed`` rather than doing its own collectives
engine. Under DDP the model and optimizer are replicated: rank 0 writes them
once. When the model's state holds DTensors (FSDP2's ``fully_shard``, tensor
parallel), every rank writes its own shards with
``torch.distributed.checkpoint`` (DCP), which also reshards on load, so a
checkpoint saved on 2 ranks restores on 1 or on 4. Each rank's random state is
kept. A checkpoint becomes visible only after every rank reported success.

DCP reads its ``.metadata`` file with plain ``pickle``; before DCP sees it,
torchkeep's allowlist scanner checks that it names nothing but DCP's own
metadata classes, and refuses files that hold pickled objects (DCP would read
those with ``torch.load(weights_only=False)``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from torchkeep.errors import CheckpointMismatchError, DistributedSaveError, UnsafeFileError, first_line

__all__ = [
    "Coordinator",
    "check_shard_metadata",
    "is_sharded",
    "load_sharded",
    "load_shards",
    "save_shards",
    "shard_files",
    "sharded_state",
    "unwrap",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_METADATA = ".metadata"
_DTYPE = re.compile(r"^torch\.[a-z0-9_]+$")
_DCP_GLOBALS = frozenset(
    [
        *(
            f"torch.distributed.checkpoint.metadata.{name}"
            for name in (
                "Metadata",
                "TensorStorageMetadata",
                "TensorProperties",
                "ChunkStorageMetadata",
                "MetadataIndex",
                "StorageMeta",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        "torch.distributed.checkpoint.filesystem._StorageInfo",
        "torch.Size",
        "torch.serialization._get_layout",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "pathlib.PurePosixPath",
        "pathlib.PureWindowsPath",
    ]
)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else ``model``)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _dtensor_type() -> type | None:
    # no DTensor can exist unless its module was imported; importing it here would cost ~1 s
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_sharded(tensors: Mapping[str, Any]) -> bool:
    """Whether any value is a DTensor (FSDP2, tensor parallel): such state is written through DCP."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(v, dtensor) for v in tensors.values())


class Coordinator:
    """The ranks of a ``torch.distributed`` job as a checkpoint sees them; a no-op in one process.

    Collectives run on a gloo group of their own, so they work under any
    backend (NCCL included) and from the background thread of an
    asynchronous save without interfering with the training's collectives.
    Every rank must construct it (it creates that group); ``enabled=False``
    makes it a one-process coordinator even inside a distributed job.
    """

    def __init__(self, *, enabled: bool | None = None) -> None:
        self.active = dist.is_available() and dist.is_initialized() and enabled is not False
        self.rank = dist.get_rank() if self.active else 0
        self.size = dist.get_world_size() if self.active else 1
        self.group: Any = dist.new_group(backend="gloo") if self.active else None

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, which writes replicated state and commits."""
        return self.rank == 0

    def share(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, by rank, on every rank."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value, group=self.group)
        return out

    def attempt(self, work: Callable[[], T], *, step: int, stage: str) -> T:
        """Run this rank's part of ``stage``, then agree with the other ranks that all of them succeeded.

        The error is handed on from inside the ``except`` block on purpose: a frame that kept
        it in a variable would also keep its own traceback (a reference cycle), and with it
        this coordinator's process group, alive until the garbage collector ran, which could
        be interpreter shutdown, where gloo aborts the process.

        Raises:
            DistributedSaveError: any rank failed (in one process: the error itself).
        """
        try:
            result = work()
        except BaseException as err:
            self.agree(err, step=step, stage=stage)  # in a job: raises DistributedSaveError
            raise  # in one process: the error itself
        self.agree(None, step=step, stage=stage)
        return result

    def agree(self, error: BaseException | None, *, step: int, stage: str) -> None:
        """Raise on every rank if any rank failed ``stage`` (a barrier when none did).

        Raises:
            DistributedSaveError: naming each failed rank and its error (in one
                process there is no one to agree with: nothing is raised).
        """
        if not self.active:
            return
        report = None if error is None else f"{type(error).__name__}: {first_line(error)}"
        failures = getattr(error, "failures", None)  # DCP's CheckpointException: each rank's own error
        if isinstance(failures, dict):
            own = failures.get(self.rank)
            report = None if own is None else f"{type(own[0]).__name__}: {first_line(own[0])}"
        failed = {rank: text for rank, text in enumerate(self.gather(report)) if text is not None}
        if failed:
            if error is not None:
                _release_frames(error)
            raise DistributedSaveError(step, stage, failed) from error


def _release_frames(error: BaseException) -> None:
    """Clear the locals of the finished frames in ``error``'s tracebacks (and its causes').

    Those frames (DCP's writer among them) hold tensors and this job's process groups, and
    often a reference cycle through the exception itself; left to the garbage collector they
    may be freed only at interpreter shutdown, where gloo aborts the process. The tracebacks
    still print (file, line, function); only their local variables go.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)  # DCP's CheckpointException: {rank: (error, stack)}
        if isinstance(failures, dict):
            pending += [pair[0] for pair in failures.values() if isinstance(pair, tuple) and pair]


def sharded_state(model: nn.Module, optimizer: Any | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The model's and optimizer's state as DCP sees them: DTensor shards, keys by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return dict(get_model_state_dict(model)), None
    model_state, optim_state = get_state_dict(model, optimizer)
    return dict(model_state), dict(optim_state)


def apply_sharded(
    model: nn.Module | None,
    optimizer: Any | None,
    model_state: dict[str, Any] | None,
    optim_state: dict[str, Any] | None,
    *,
    strict: bool,
) -> None:
    """Load DCP-shaped state into a (sharded or plain) model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_state_dict,
    )

    options = StateDictOptions(strict=strict)
    if model is None:
        return
    if optimizer is None:
        set_model_state_dict(model, model_state or {}, options=options)
        return
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state or {},
        optim_state_dict=optim_state or {},
        options=options,
    )


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns that it "assumes the intent" of one process; here one process is the intent
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def save_shards(tensors: dict[str, torch.Tensor], folder: Path, coordinator: Coordinator) -> None:
    """Every rank writes its shards of ``tensors`` to ``folder`` (collective)."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save

    writer = FileSystemWriter(str(folder), overwrite=True)
    with _quiet_single_process():
        save(tensors, storage_writer=writer, process_group=coordinator.group, no_dist=not coordinator.active)


def shard_files(folder: Path, rank: int) -> list[Path]:
    """The files of ``folder`` this rank wrote (DCP names them ``__<rank>_<n>.distcp``; rank 0 also
    writes ``.metadata``)."""
    mine = [p for p in folder.iterdir() if p.name.startswith(f"__{rank}_")]
    if rank == 0 and (folder / _METADATA).is_file():
        mine.append(folder / _METADATA)
    return sorted(mine)


def check_shard_metadata(folder: Path, *, allow_pickled: bool = False) -> Any:
    """DCP's metadata of ``folder``, read only after the allowlist check.

    Args:
        folder (Path): the DCP folder.
        allow_pickled (bool, default False): accept checkpoints that also hold
            pickled (non-tensor) items, for callers that read tensors only.

    Raises:
        UnsafeFileError: the metadata would import anything but DCP's metadata
            classes, or the checkpoint holds pickled objects (unless allowed).
        CheckpointMismatchError: there is no metadata.
    """
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from torchkeep.safety import scan

    path = folder / _METADATA
    if not path.is_file():
        raise CheckpointMismatchError(
            folder, "shards", f"{folder} holds no DCP {_METADATA} file", "point to a complete checkpoint"
        )
    result = scan(path)
    outside = [name for name in result.imports if name not in _DCP_GLOBALS and not _DTYPE.match(name)]
    if result.verdict in ("CORRUPT", "ERROR") or outside:
        raise UnsafeFileError(
            path, outside, reason=None if outside else f"is not a DCP metadata file ({result.reason})"
        )
    metadata = FileSystemReader(str(folder)).read_metadata()
    pickled = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    if pickled and not allow_pickled:
        raise UnsafeFileError(
            path,
            reason=f"holds pickled objects ({', '.join(pickled[:5])}), which DCP would load with "
            "torch.load(weights_only=False); torchkeep writes tensors only",
        )
    return metadata


def load_shards(
    tensors: dict[str, torch.Tensor],
    folder: Path,
    coordinator: Coordinator | None,
    *,
    allow_pickled: bool = False,
) -> None:
    """Fill ``tensors`` (DTensors or plain, any sharding) from the shards in ``folder`` (collective).

    Only the tensors asked for are read; the metadata passes the allowlist check first.
    """
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import load

    check_shard_metadata(folder, allow_pickled=allow_pickled)
    active = coordinator is not None and coordinator.active
    with _quiet_single_process():
        load(
            tensors,
            storage_reader=FileSystemReader(str(folder)),
            process_group=coordinator.group if active and coordinator else None,
            no_dist=not active,
        )


def _tensor_refs(data: Any, found: set[str]) -> set[str]:
    if isinstance(data, list):
        for value in data:
            _tensor_refs(value, found)
    elif isinstance(data, dict):
        if data.get("__tk__") == "tensor":
            found.add(data["v"])
        else:
            for value in data.values():
                _tensor_refs(value, found)
    return found


def load_sharded(
    folder: Path,
    state: dict[str, Any],
    model: nn.Module | None,
    optimizer: Any | None,
    *,
    strict: bool,
    coordinator: Coordinator,
) -> list[str]:
    """Put a sharded checkpoint's model and optimizer state (``shards/``) into ``model`` / ``optimizer``.

    ``state`` is the checkpoint's ``state.json``; the shards are resharded to this job. Returns
    the names restored.

    Raises:
        CheckpointMismatchError: the checkpoint does not fit the model (and optimizer).
    """
    from torchkeep.run.layout import SHARD_MODEL, SHARDS  # the run package imports this module
    from torchkeep.serialize import flatten, unflatten

    if model is None:
        if optimizer is not None:
            raise CheckpointMismatchError(
                folder,
                "optimizer",
                "this checkpoint's optimizer state is keyed by the model's parameter names",
                "pass model= too",
            )
        return []
    saved_optim = state["parts"].get("optimizer")
    if optimizer is not None and saved_optim is None:
        raise CheckpointMismatchError(
            folder, "optimizer", "the checkpoint holds no optimizer state", "restore without optimizer="
        )
    module = unwrap(model)
    model_sd, optim_sd = sharded_state(module, optimizer)
    template: dict[str, torch.Tensor] = {f"{SHARD_MODEL}{key}": value for key, value in model_sd.items()}
    saved = {f"{SHARD_MODEL}{key}" for key in state["model"]}
    if optimizer is not None and optim_sd is not None:
        flatten(optim_sd, "optimizer", template)
        saved |= _tensor_refs(saved_optim, set())
    missing = sorted(set(template) - saved)
    unexpected = sorted(
        k for k in saved - set(template) if k.startswith(SHARD_MODEL) or optimizer is not None
    )
    if missing or (strict and unexpected):
        raise CheckpointMismatchError(
            folder,
            "model",
            f"missing from the checkpoint: {missing[:5]}; not in the model: {unexpected[:5]}",
            "build the same model (and optimizer) as the run that saved it",
        )
    wanted = {key: template[key] for key in template if key in saved}
    load_shards(wanted, folder / SHARDS, coordinator)
    loaded_model = {key: template[f"{SHARD_MODEL}{key}"] for key in model_sd}
    loaded_optim = unflatten(saved_optim, template) if optimizer is not None else None
    apply_sharded(module, optimizer, loaded_model, loaded_optim, strict=strict)
    return ["model"] + (["optimizer"] if optimizer is not None else [])

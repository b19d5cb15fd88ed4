"""Single-file training checkpoints in the classic PyTorch layout.

``save_checkpoint`` writes the dict every PyTorch tutorial writes by hand
(``epoch``, ``model_state_dict``, ``optimizer_state_dict``, ``loss``, …), built
only from types that ``torch.load(path, weights_only=True)`` reads, so the file
loads anywhere without allowlists. ``load_checkpoint`` reads those, hand-written
ones, and the files and folders other libraries write (Lightning, timm,
pytorch/examples, HF Trainer, accelerate), recognised by
:mod:`torchkeep.layouts`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from torchkeep.errors import UnserializableValueError
from torchkeep.formats import FileFormat, suffix_format
from torchkeep.layouts import Reading, read_checkpoint
from torchkeep.layouts.optimizers import choose
from torchkeep.load_report import LoadReport
from torchkeep.restoring import apply_states, restore_saved_rng
from torchkeep.rng import capture_rng_state
from torchkeep.safety import DEFAULT_LIMITS, Limits
from torchkeep.safety.opaque import VALUE_TYPES
from torchkeep.storage import atomic_target
from torchkeep.weights import MapLocation, to_state_dict

__all__ = ["CheckpointInfo", "Stateful", "load_checkpoint", "save_checkpoint"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_CHECKPOINT_SUFFIXES = {
    ".tar": FileFormat.TORCH_ZIP,
    ".pt": FileFormat.TORCH_ZIP,
    ".pth": FileFormat.TORCH_ZIP,
    ".ckpt": FileFormat.TORCH_ZIP,
}
_ATOMS = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device, torch.Size)
_KEY_TYPES = (str, int, float, bool, type(None))


class Stateful(Protocol):
    """Anything checkpointable: an optimizer, a scheduler, a scaler, a data loader, your own object."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any: ...


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint held, and what was restored from it.

    Attributes:
        path: the checkpoint file or folder (a URL for a remote run).
        epoch, step, loss: as saved (``None`` where absent); ``epoch`` is a
            float for an HF Trainer checkpoint saved mid-epoch, ``step`` is
            Lightning's ``global_step`` and HF's ``global_step``.
        metrics: saved metrics (ImageNet-style files: ``best_acc1`` …).
        extra: saved user values; for other libraries' layouts, the entries
            torchkeep does not map (e.g. ``pytorch-lightning_version``,
            timm's ``saver``, HF's whole ``trainer_state``).
        restored: the parts restored, e.g. ``("model", "optimizer", "rng")``
            (``"optimizer[1]"`` for the second of a list).
        layout: ``"torchkeep"``, ``"classic"`` (hand-written), ``"lightning"``,
            ``"timm"``, ``"imagenet"`` (pytorch/examples), ``"optimizer"`` (a
            bare optimizer state), ``"hf-trainer"``, ``"accelerate"`` or ``"weights"``.
        model_report: what the model load did, when a model was given.
        hyper_parameters: configuration saved with the weights: Lightning's
            ``hyper_parameters``, timm's and ImageNet's ``args`` and
            ``arch``, HF's ``training_args``. Objects that would need code
            to build are inert :class:`~torchkeep.Opaque` placeholders
            unless rebuilt (``rebuild=``). A config object saved whole
            (Lightning with an omegaconf ``DictConfig``) is the one entry
            ``"hyper_parameters"``.
        callbacks: Lightning callback states by callback key (ModelCheckpoint's
            ``best_model_score``, ``best_model_path`` …).
        loops: Lightning's loop state (``fit_loop`` …).
        best_metric, best_checkpoint: the best score and its checkpoint, from
            Lightning's ModelCheckpoint, HF's ``trainer_state.json``
            (``best_metric``, ``best_model_checkpoint``) or timm's saver.
        log_history: HF Trainer's ``log_history``.
        placeholders: where each placeholder is, e.g.
            ``"hyper_parameters['args']: argparse.Namespace"``.
        skipped: what the checkpoint holds that was not read or restored, and why.
    """

    path: Path | str
    epoch: int | float | None = None
    step: int | None = None
    loss: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    restored: tuple[str, ...] = ()
    layout: str = "torchkeep"
    model_report: LoadReport | None = None
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    loops: dict[str, Any] = field(default_factory=dict)
    best_metric: float | None = None
    best_checkpoint: str | None = None
    log_history: list[Any] = field(default_factory=list)
    placeholders: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()


def to_plain(value: Any, where: str) -> Any:
    """A copy of ``value`` made only of types ``torch.load(weights_only=True)`` reads.

    NumPy scalars become Python numbers and NumPy arrays become tensors;
    tensors are detached. Anything else raises.

    Raises:
        UnserializableValueError: a value of another type; ``where`` says where.
    """
    if isinstance(value, torch.Tensor):
        return value.detach()
    if type(value) in _ATOMS:
        return value
    # subclasses (IntEnum, numpy.float64, torch's TorchVersion) would pickle as their own class
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, _ATOMS):
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, _KEY_TYPES):
                raise UnserializableValueError(f"the key {key!r} in {where}", type(key).__name__)
            out[key] = to_plain(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, list | tuple | set):
        items = [to_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return type(value)(items) if not hasattr(value, "_fields") else tuple(items)
    module = type(value).__module__
    if module == "numpy":
        if hasattr(value, "shape") and getattr(value, "ndim", 0) > 0:
            return torch.from_numpy(value.copy())
        return value.item()
    raise UnserializableValueError(where, f"{module}.{type(value).__qualname__}")


def _loss_value(loss: float | torch.Tensor | None) -> float | None:
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        return float(loss.detach().item())
    return float(loss)


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: Stateful | None = None,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    epoch: int | None = None,
    step: int | None = None,
    loss: float | torch.Tensor | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    durable: bool = True,
) -> Path:
    """Save a training checkpoint to one file, atomically.

    The file is a ``torch.save`` zip holding the classic dict
    (``epoch``, ``model_state_dict``, ``optimizer_state_dict``, ``loss``, and
    ``step``, ``scheduler_state_dict``, ``scaler_state_dict``, ``metrics``,
    ``extra``, ``rng_state`` as given), so plain
    ``torch.load(path, weights_only=True)`` reads it.

    Args:
        path (str | PathLike): ``.tar``, ``.pt``, ``.pth`` or ``.ckpt``.
        model (nn.Module): the model.
        optimizer, scheduler, scaler (Stateful | None, default None): objects
            with ``state_dict()``, saved when given.
        epoch, step (int | None, default None): progress counters.
        loss (float | Tensor | None, default None): stored as a float.
        metrics (Mapping[str, Any] | None, default None): e.g. ``{"val_acc": 0.9}``.
        extra (Mapping[str, Any] | None, default None): any plain values of yours.
        durable (bool, default True): fsync before the file replaces ``path``.

    Returns:
        The path written.

    Raises:
        UnsupportedSuffixError: another suffix.
        UnserializableValueError: a value a safe loader could not read back.

    Example:
        >>> torchkeep.save_checkpoint("ckpt.tar", model=model, optimizer=opt, epoch=5, loss=0.4)
    """
    target = Path(path)
    suffix_format(target, _CHECKPOINT_SUFFIXES, what="a checkpoint")
    content: dict[str, Any] = {
        "epoch": epoch,
        "step": step,
        "model_state_dict": to_state_dict(model),
        "loss": _loss_value(loss),
    }
    for key, obj in (
        ("optimizer_state_dict", optimizer),
        ("scheduler_state_dict", scheduler),
        ("scaler_state_dict", scaler),
    ):
        if obj is not None:
            content[key] = to_plain(obj.state_dict(), key)
    content["metrics"] = to_plain(dict(metrics or {}), "metrics")
    content["extra"] = to_plain(dict(extra or {}), "extra")
    content["rng_state"] = capture_rng_state()
    content["torchkeep"] = {"format_version": FORMAT_VERSION, "torch_version": str(torch.__version__)}
    with atomic_target(target, durable=durable) as tmp:
        torch.save(content, tmp)
    logger.info("saved checkpoint (epoch %s, step %s) to %s", epoch, step, target)
    return target


OpaqueMode = Literal["placeholder", "refuse"]


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    optimizer: Stateful | Sequence[Stateful] | None = None,
    scheduler: Stateful | Sequence[Stateful] | None = None,
    scaler: Stateful | None = None,
    optimizer_index: int | None = None,
    scheduler_index: int | None = None,
    map_location: MapLocation = "cpu",
    restore_rng: bool = False,
    strict: bool = True,
    trust: bool = False,
    opaque: OpaqueMode = "placeholder",
    rebuild: Collection[str] = (),
    limits: Limits = DEFAULT_LIMITS,
) -> CheckpointInfo:
    """Restore a training checkpoint into the objects given.

    Reads files from :func:`save_checkpoint`, classic dicts saved by hand with
    ``torch.save({...}, path)``, Lightning ``.ckpt`` files, timm
    ``CheckpointSaver`` and pytorch/examples ImageNet files (``state_dict``,
    ``optimizer``, ``arch``, ``best_acc1``), bare optimizer states (HF's
    ``optimizer.pt``), HF Trainer ``checkpoint-N/`` folders, accelerate
    ``save_state()`` folders, and bare state dicts. Everything is checked
    before anything is changed: a checkpoint that does not fit leaves the
    model and optimizer as they were. The optimizer's state moves to the
    device of the model's parameters.

    Several optimizers (Lightning, accelerate): pass them as a list in the
    order the run created them, or one with ``optimizer_index=``; a file
    holding several states and one optimizer without an index is refused
    with a listing of what it holds. Every saved state tensor is compared
    with its parameter's shape first.

    Hyper-parameters that would need code to build (``argparse.Namespace``,
    paths, dates, dataclasses, enums, omegaconf configs in Lightning
    ``hyper_parameters``, timm's ``args``, HF's ``training_args.bin``) make
    ``torch.load(weights_only=True)`` refuse the whole file. With
    ``opaque="placeholder"`` (the default) they come back as inert
    :class:`~torchkeep.Opaque` placeholders showing the class and its data:
    nothing is imported or called, whatever the file names (an
    ``os.system`` "hyper-parameter" is a placeholder holding a string). The
    default is safe because placeholders are only allowed in
    hyper-parameter entries (:data:`~torchkeep.layouts.HYPER_PARAMETER_KEYS`),
    never in weights, optimizer or scheduler state, which still refuse such
    files (``UnsafeFileError``), as ``load_weights`` and ``torchkeep scan``
    always do; refusing instead only pushes people to ``trust=True``, which
    does run the file's code. ``info.placeholders`` lists each one.

    Args:
        path (str | PathLike): the checkpoint file or folder.
        model (nn.Module | None, default None): receives the weights.
        optimizer (Stateful | Sequence[Stateful] | None, default None):
            receives the optimizer state; a list receives one state each.
        scheduler (Stateful | Sequence[Stateful] | None, default None): likewise.
        scaler (Stateful | None, default None): the AMP grad scaler.
        optimizer_index, scheduler_index (int | None, default None): which
            saved state a single optimizer/scheduler receives when the
            checkpoint holds several.
        map_location (str | torch.device, default "cpu"): where tensors are read to.
        restore_rng (bool, default False): restore Python/NumPy/torch/CUDA RNG
            states saved with the checkpoint (HF's ``rng_state.pth`` and
            accelerate's ``random_states_0.pkl`` too).
        strict (bool, default True): passed to :func:`load_into` for the model.
        trust (bool, default False): allow unpickling any object. This runs
            code named in the file: only for files you trust.
        opaque ("placeholder" | "refuse", default "placeholder"): what objects
            needing code in hyper-parameter entries become: inert
            placeholders, or a refusal of the whole file (``UnsafeFileError``,
            as ``torch.load(weights_only=True)``).
        rebuild (Collection[str], default ()): placeholders of these
            well-known value types (any of
            :data:`torchkeep.safety.opaque.VALUE_TYPES`, e.g.
            ``("argparse.Namespace", "pathlib.PosixPath", "datetime.date")``,
            or ``VALUE_TYPES`` itself) are
            rebuilt into real values by torchkeep's own code, never by the
            class the file names.
        limits (Limits, default Limits()): bounds on what the file may ask
            for, checked before allocating.

    Returns:
        A :class:`CheckpointInfo` with progress, metrics, hyper-parameters and what was restored.

    Raises:
        CheckpointMismatchError: the checkpoint lacks a part that was passed
            (or holds an entry that looks like it but is not usable: said
            so), an optimizer state does not fit (groups, hyper-parameters,
            state shapes), or several optimizer states and no index.
        KeyMismatchError: the model does not fit the saved weights.
        NotAStateDictError: the file is not a checkpoint.
        UnsafeFileError: weights or states that need code to load (or any
            such object, with ``opaque="refuse"``); nothing was unpickled.
        LimitExceededError, CorruptFileError: as for :func:`load_weights`.
        ValueError: ``rebuild`` names a type torchkeep cannot rebuild.

    Example:
        >>> info = torchkeep.load_checkpoint("ckpt.tar", model=model, optimizer=opt)
        >>> start_epoch = info.epoch + 1
        >>> info = torchkeep.load_checkpoint("last.ckpt", model=m, optimizer=[opt_g, opt_d])
        >>> info.hyper_parameters["args"]           # an Opaque placeholder
        >>> from torchkeep.safety.opaque import VALUE_TYPES
        >>> torchkeep.load_checkpoint("last.ckpt", model=m, rebuild=VALUE_TYPES)
    """
    p = Path(path)
    if opaque not in ("placeholder", "refuse"):
        raise ValueError(f"opaque={opaque!r}: pass 'placeholder' (the default) or 'refuse'")
    rebuild_types = tuple(rebuild)
    unknown = sorted(set(rebuild_types) - VALUE_TYPES)
    if unknown:
        raise ValueError(
            f"rebuild= names {', '.join(unknown)}, which torchkeep cannot rebuild without running the "
            f"file's code; it rebuilds {', '.join(sorted(VALUE_TYPES))} (or pass trust=True for a file "
            "you trust)"
        )
    if (
        p.is_dir()
        and (p / "manifest.json").is_file()
        and not isinstance(optimizer, Sequence)
        and not isinstance(scheduler, Sequence)
    ):  # a Checkpointer's checkpoint folder: the run package owns that layout (and its shared packs)
        from torchkeep.run import Checkpointer

        info = Checkpointer(p.parent, read_only=True).restore(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            restore_rng=restore_rng,
            strict=strict,
            map_location=map_location,
            path=p,
        )
        if info is None:  # pragma: no cover - restore(path=) restores that folder or raises
            raise RuntimeError(f"{p}: nothing restored")
        return info
    reading = Reading(map_location, trust, limits, opaque == "placeholder", rebuild_types)
    given: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    saved = read_checkpoint(p, reading, {name for name, obj in given.items() if obj is not None} | {"rng"})
    parts: dict[str, Any] = {"model": saved.model, "scaler": saved.scaler}
    objects: dict[str, Any] = {"model": model}
    for part, obj, index, states in (
        ("optimizer", optimizer, optimizer_index, saved.optimizers),
        ("scheduler", scheduler, scheduler_index, saved.schedulers),
    ):
        if obj is None:
            continue
        for name, one, state in choose(p, part, obj, states, index):
            objects[name], parts[name] = one, state
    objects["scaler"] = scaler
    available = saved.entries
    restored, report = apply_states(
        p, parts, objects, strict=strict, available=available, absent=saved.absent
    )
    if restore_rng:
        restored += restore_saved_rng(p, saved)
    loss = saved.loss
    info = CheckpointInfo(
        path=p,
        epoch=saved.epoch,
        step=saved.step,
        loss=_loss_value(loss) if isinstance(loss, float | int | torch.Tensor) else None,
        metrics=saved.metrics,
        extra=saved.extra,
        restored=tuple(restored),
        layout=saved.layout,
        model_report=report,
        hyper_parameters=saved.hyper_parameters,
        callbacks=saved.callbacks,
        loops=saved.loops,
        best_metric=saved.best_metric,
        best_checkpoint=saved.best_checkpoint,
        log_history=saved.log_history,
        placeholders=tuple(saved.placeholders),
        skipped=tuple(saved.skipped),
    )
    logger.info("restored %s from %s (epoch %s)", ", ".join(restored) or "nothing", p, info.epoch)
    return info

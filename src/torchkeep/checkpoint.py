"""Single-file training checkpoints in the classic PyTorch layout.

``save_checkpoint`` writes the dict every PyTorch tutorial writes by hand
(``epoch``, ``model_state_dict``, ``optimizer_state_dict``, ``loss``, …), built
only from types that ``torch.load(path, weights_only=True)`` reads, so the file
loads anywhere without allowlists. ``load_checkpoint`` reads those, hand-written
ones, and Lightning ``.ckpt`` files.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from torchkeep.errors import (
    CheckpointMismatchError,
    NotAStateDictError,
    RngRestoreWarning,
    TorchkeepError,
    UnserializableValueError,
    first_line,
)
from torchkeep.formats import FileFormat, detect_format, suffix_format
from torchkeep.loading import LoadReport, load_into
from torchkeep.rng import capture_rng_state, restore_rng_state
from torchkeep.safety import DEFAULT_LIMITS, Limits
from torchkeep.safety.allowlist import brief
from torchkeep.storage import atomic_target
from torchkeep.weights import MapLocation, load_weights, read_torch_file, to_state_dict

__all__ = ["CheckpointInfo", "Stateful", "apply_states", "load_checkpoint", "save_checkpoint"]

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
        epoch, step, loss: as saved (``None`` where absent).
        metrics: saved metrics.
        extra: saved user values.
        restored: the parts restored, e.g. ``("model", "optimizer", "rng")``.
        layout: ``"torchkeep"``, ``"classic"`` (hand-written), ``"lightning"`` or ``"weights"``.
        model_report: what the model load did, when a model was given.
    """

    path: Path | str
    epoch: int | None = None
    step: int | None = None
    loss: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    restored: tuple[str, ...] = ()
    layout: str = "torchkeep"
    model_report: LoadReport | None = None


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


def _layout(content: Mapping[str, Any]) -> str:
    if "torchkeep" in content:
        return "torchkeep"
    if "optimizer_states" in content or "pytorch-lightning_version" in content:
        return "lightning"
    if "model_state_dict" in content:
        return "classic"
    return "weights"


def _malformed(path: Path, layout: str, what: str, expected: str) -> NotAStateDictError:
    return NotAStateDictError(
        path,
        f"a {layout} checkpoint whose {what}",
        hint=f"a readable checkpoint has {expected}; the file was not written by save_checkpoint or "
        "Lightning as it is (load its weights alone with torchkeep.load_weights(path, key=...))",
    )


def _check_layout(path: Path, content: Mapping[str, Any], layout: str) -> None:
    """Refuse, before anything is restored, entries whose type no writer of ``layout`` produces.

    Raises:
        NotAStateDictError: e.g. Lightning ``optimizer_states`` that is not a
            list, ``metrics`` that is not a dict, a ``loss`` of several values.
    """
    if layout == "lightning":
        for name in ("optimizer_states", "lr_schedulers"):
            value = content.get(name)
            if value is not None and not (
                isinstance(value, list | tuple) and all(v is None or isinstance(v, Mapping) for v in value)
            ):
                raise _malformed(
                    path, layout, f"{name!r} is a {type(value).__name__}", "a list of dicts there"
                )
        names: tuple[str, ...] = ("state_dict", "native_amp_scaling_state")
    elif layout == "weights":
        names = ()
    else:
        names = ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "scaler_state_dict")
    for name in (*names, "metrics", "extra"):
        value = content.get(name)
        if value is not None and not isinstance(value, Mapping):
            raise _malformed(
                path, layout, f"{name!r} is a {type(value).__name__}", f"a dict (or nothing) as {name!r}"
            )
    for name in ("epoch", "step", "global_step"):
        value = content.get(name)
        if value is not None and (type(value) is not int or not -(2**63) <= value < 2**63):
            raise _malformed(path, layout, f"{name!r} is {brief(value)}", f"an int as {name!r}")
    loss = content.get("loss")
    if isinstance(loss, torch.Tensor) and loss.numel() != 1:
        raise _malformed(path, layout, f"'loss' is a tensor of {loss.numel()} values", "one number as 'loss'")
    if isinstance(loss, int | float) and not isinstance(loss, bool) and abs(loss) > 2.0**1023:
        raise _malformed(path, layout, "'loss' is a number no float can hold", "one number as 'loss'")


def _parts(content: Mapping[str, Any], layout: str) -> dict[str, Any]:
    """The model/optimizer/scheduler/scaler states, whatever the layout calls them."""
    if layout == "lightning":
        optimizers = content.get("optimizer_states") or [None]
        schedulers = content.get("lr_schedulers") or [None]
        return {
            "model": content.get("state_dict"),
            "optimizer": optimizers[0],
            "scheduler": schedulers[0],
            "scaler": content.get("native_amp_scaling_state"),
        }
    if layout == "weights":
        return {"model": content, "optimizer": None, "scheduler": None, "scaler": None}
    return {
        "model": content.get("model_state_dict"),
        "optimizer": content.get("optimizer_state_dict"),
        "scheduler": content.get("scheduler_state_dict"),
        "scaler": content.get("scaler_state_dict"),
    }


def _check_optimizer(path: Path, optimizer: Any, saved: Mapping[str, Any]) -> None:
    groups = optimizer.state_dict()["param_groups"]
    saved_groups = saved.get("param_groups", [])
    if not (
        isinstance(saved_groups, list | tuple)
        and all(
            isinstance(g, Mapping) and isinstance(g.get("params", []), list | tuple) for g in saved_groups
        )
    ):
        raise CheckpointMismatchError(
            path,
            "optimizer",
            f"its param_groups is {brief(saved_groups)}, not a list of dicts with a list of params",
            "restore without optimizer= (the saved optimizer state is not one torch writes)",
        )
    if len(groups) != len(saved_groups):
        raise CheckpointMismatchError(
            path,
            "optimizer",
            f"it has {len(saved_groups)} parameter group(s), the optimizer has {len(groups)}",
            "build the optimizer with the same param groups as the run that saved it "
            "(e.g. the same torchkeep.param_groups(...) call)",
        )
    for index, (group, saved_group) in enumerate(zip(groups, saved_groups, strict=True)):
        if len(group["params"]) != len(saved_group.get("params", [])):
            raise CheckpointMismatchError(
                path,
                "optimizer",
                f"parameter group {index} holds {len(saved_group.get('params', []))} parameters in the "
                f"checkpoint and {len(group['params'])} in the optimizer",
                "build the optimizer over the same parameters (same frozen/trainable split) as when saving",
            )


def apply_states(
    path: Path,
    parts: Mapping[str, Any],
    given: Mapping[str, Any],
    *,
    strict: bool,
    available: list[str],
) -> tuple[list[str], LoadReport | None]:
    """Load saved states into the given objects, after checking that everything fits.

    ``parts`` maps a name (``"model"``, ``"optimizer"``, a stateful's name) to
    its saved state (``None`` when absent); ``given`` maps names to the
    objects to restore (``None`` to skip). The model goes through
    :func:`load_into`, the rest through ``load_state_dict``. Every check that
    can fail runs before the first object changes.

    Returns:
        The names restored, and the model's :class:`LoadReport` (if a model was given).
    """
    for name, obj in given.items():
        if obj is not None and parts.get(name) is None:
            raise CheckpointMismatchError(
                path,
                name,
                f"the checkpoint holds no {name} state (it has: {', '.join(available)})",
                f"restore without {name}=",
            )
    if given.get("optimizer") is not None:
        _check_optimizer(path, given["optimizer"], parts["optimizer"])
    restored: list[str] = []
    report = None
    if given.get("model") is not None:
        report = load_into(given["model"], parts["model"], strict=strict)
        restored.append("model")
    for name, obj in given.items():
        if name != "model" and obj is not None:
            try:
                obj.load_state_dict(parts[name])
            except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as err:
                if isinstance(err, TorchkeepError):
                    raise
                raise CheckpointMismatchError(
                    path,
                    name,
                    "its load_state_dict refused the saved state "
                    f"({type(err).__name__}: {first_line(err)[:200]})",
                    f"restore without {name}=, or build the {name} as the run that saved it did",
                ) from err
            restored.append(name)
    return restored, report


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    optimizer: Stateful | None = None,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    map_location: MapLocation = "cpu",
    restore_rng: bool = False,
    strict: bool = True,
    trust: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> CheckpointInfo:
    """Restore a training checkpoint into the objects given.

    Reads files from :func:`save_checkpoint`, classic dicts saved by hand with
    ``torch.save({...}, path)``, Lightning ``.ckpt`` files, and bare state
    dicts. Everything is checked before anything is changed: a checkpoint
    that does not fit leaves the model and optimizer as they were. The
    optimizer's state moves to the device of the model's parameters.

    Args:
        path (str | PathLike): the checkpoint.
        model (nn.Module | None, default None): receives the weights.
        optimizer, scheduler, scaler (Stateful | None, default None): receive
            their states; the checkpoint must hold them.
        map_location (str | torch.device, default "cpu"): where tensors are read to.
        restore_rng (bool, default False): restore Python/NumPy/torch/CUDA RNG
            states saved with the checkpoint.
        strict (bool, default True): passed to :func:`load_into` for the model.
        trust (bool, default False): allow unpickling any object (old
            checkpoints holding NumPy scalars or custom classes). This runs
            code named in the file: only for files you trust.
        limits (Limits, default Limits()): bounds on what the file may ask
            for, checked before allocating.

    Returns:
        A :class:`CheckpointInfo` with epoch, step, loss, metrics and extra.

    Raises:
        CheckpointMismatchError: the checkpoint lacks a part that was passed,
            or the optimizer's parameter groups differ.
        KeyMismatchError: the model does not fit the saved weights.
        NotAStateDictError: the file is not a checkpoint.
        UnsafeFileError, LimitExceededError, CorruptFileError: as for
            :func:`load_weights`.

    Example:
        >>> info = torchkeep.load_checkpoint("ckpt.tar", model=model, optimizer=opt)
        >>> start_epoch = info.epoch + 1
    """
    p = Path(path)
    if detect_format(p) in {FileFormat.SAFETENSORS, FileFormat.TORCH_EXPORT}:
        content: object = load_weights(p, map_location=map_location, limits=limits)  # bare weights
    else:
        content = read_torch_file(p, map_location=map_location, trust=trust, limits=limits)
    if not isinstance(content, Mapping):
        raise NotAStateDictError(
            p, f"a {type(content).__name__}", hint="pass a checkpoint file written by save_checkpoint"
        )
    layout = _layout(content)
    _check_layout(p, content, layout)
    parts = _parts(content, layout)
    given = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    restored, report = apply_states(p, parts, given, strict=strict, available=list(map(str, content)))
    if restore_rng:
        if "rng_state" in content:
            rng = content["rng_state"]
            try:
                if not isinstance(rng, Mapping):
                    raise TypeError(f"the RNG state is a {type(rng).__name__}")
                restore_rng_state(dict(rng))
            except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as err:
                if isinstance(err, TorchkeepError):
                    raise
                raise CheckpointMismatchError(
                    p,
                    "rng",
                    f"the saved RNG state cannot be restored ({type(err).__name__}: {first_line(err)[:200]})",
                    "pass restore_rng=False",
                ) from err
            restored.append("rng")
        else:
            warnings.warn(
                f"{p} holds no RNG state; random streams were not restored", RngRestoreWarning, stacklevel=2
            )
    step = content.get("global_step") if layout == "lightning" else content.get("step")
    loss = content.get("loss")
    info = CheckpointInfo(
        path=p,
        epoch=content.get("epoch"),
        step=step,
        loss=_loss_value(loss) if isinstance(loss, float | int | torch.Tensor) else None,
        metrics=dict(content.get("metrics") or {}),
        extra=dict(content.get("extra") or {}),
        restored=tuple(restored),
        layout=layout,
        model_report=report,
    )
    logger.info("restored %s from %s (epoch %s)", ", ".join(restored) or "nothing", p, info.epoch)
    return info

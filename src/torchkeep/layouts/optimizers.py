"""Saved optimizer states: recognise them, describe them, and check one fits an optimizer.

torch's ``Optimizer.load_state_dict`` only compares parameter counts: the
state of another optimizer (Adam's ``exp_avg`` for an SGD) or of other
parameters of the same count loads without a word and fails steps later.
:func:`check_fits` compares every state tensor's shape with its parameter
and the saved hyper-parameters with the optimizer's, before anything changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CheckpointMismatchError
from torchkeep.safety.allowlist import brief

__all__ = ["check_fits", "choose", "describe", "guess_class", "is_optimizer_state", "problem"]

# per-parameter state keys -> the torch optimizer that writes them (most specific first)
_STATE_KEYS: tuple[tuple[frozenset[str], str], ...] = (
    (frozenset({"exp_avg", "exp_avg_sq", "mu_product"}), "NAdam"),
    (frozenset({"exp_avg", "exp_avg_sq"}), "Adam/AdamW"),
    (frozenset({"exp_avg", "exp_inf"}), "Adamax"),
    (frozenset({"square_avg", "acc_delta"}), "Adadelta"),
    (frozenset({"square_avg"}), "RMSprop"),
    (frozenset({"momentum_buffer"}), "SGD"),
    (frozenset({"sum"}), "Adagrad"),
    (frozenset({"prev", "step_size"}), "Rprop"),
    (frozenset({"eta", "mu", "ax"}), "ASGD"),
    (frozenset({"row_var", "col_var"}), "Adafactor"),
)
# parameter-group keys that only one family has
_GROUP_KEYS: tuple[tuple[str, str], ...] = (
    ("momentum_decay", "NAdam"),
    ("betas", "Adam/AdamW"),
    ("rho", "Adadelta"),
    ("alpha", "RMSprop"),
    ("lr_decay", "Adagrad"),
    ("etas", "Rprop"),
    ("lambd", "ASGD"),
    ("dampening", "SGD"),
)
# state of optimizers whose tensors are not shaped like their parameter
_UNSHAPED = {"row_var", "col_var", "d", "old_dirs", "old_stps", "ro", "al", "prev_flat_grad", "H_diag"}


def is_optimizer_state(value: object) -> bool:
    """Whether ``value`` is shaped like ``optimizer.state_dict()``: ``state`` and ``param_groups``."""
    return isinstance(value, Mapping) and "param_groups" in value and "state" in value


def problem(value: object) -> str | None:
    """Why ``value`` is not an optimizer state dict torch could load (None when it is one)."""
    if not isinstance(value, Mapping):
        return f"is {brief(value)}, not an optimizer state dict (a dict with 'state' and 'param_groups')"
    if not is_optimizer_state(value):
        return (
            f"is a dict of {', '.join(map(str, list(value)[:6]))}, not an optimizer state dict "
            "(torch's optimizer.state_dict() has 'state' and 'param_groups')"
        )
    groups, state = value["param_groups"], value["state"]
    if not isinstance(state, Mapping):
        return f"has a 'state' that is {brief(state)}, not a dict of parameter states"
    if not (
        isinstance(groups, list | tuple)
        and all(isinstance(g, Mapping) and isinstance(g.get("params", []), list | tuple) for g in groups)
    ):
        return f"has param_groups {brief(groups)}, not a list of dicts with a list of params"
    return None


def guess_class(saved: Mapping[str, Any]) -> str:
    """The torch optimizer that most likely wrote ``saved`` (``"Adam/AdamW"``, ``"SGD"``, ``"unknown"``)."""
    keys: set[str] = set()
    state = saved.get("state")
    if isinstance(state, Mapping):
        for entry in state.values():
            if isinstance(entry, Mapping):
                keys.update(str(k) for k in entry)
    for needed, name in _STATE_KEYS:
        if needed <= keys:
            return name
    groups = saved.get("param_groups")
    first = groups[0] if isinstance(groups, list | tuple) and groups else {}
    for key, name in _GROUP_KEYS:
        if isinstance(first, Mapping) and key in first:
            return name
    return "unknown"


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else "?"


def describe(saved: Any) -> str:
    """One line on a saved optimizer state: likely class, state keys, groups, parameter shapes."""
    if problem(saved) is not None:
        return brief(saved)
    state, groups = saved["state"], saved["param_groups"]
    keys = sorted({str(k) for entry in state.values() if isinstance(entry, Mapping) for k in entry})
    shapes = []
    for group in groups:
        for pid in group.get("params", []):
            entry = state.get(pid) if isinstance(pid, int | str) else None
            tensors = [v for k, v in (entry or {}).items() if isinstance(v, torch.Tensor) and v.ndim > 0]
            shapes.append(_shape(tensors[0]) if tensors else "no state")
    count = sum(len(g.get("params", [])) for g in groups)
    shown = ", ".join(shapes[:6]) + (", …" if len(shapes) > 6 else "")
    return (
        f"{guess_class(saved)}-like (state {', '.join(keys) or 'empty'}; {len(groups)} group(s), "
        f"{count} parameter(s): {shown})"
    )


def _hyper_keys_missing(optimizer: Any, saved_group: Mapping[str, Any]) -> list[str]:
    """The optimizer's numeric hyper-parameters the saved group lacks (not flags torch added later)."""
    defaults = getattr(optimizer, "defaults", {})
    return sorted(
        k for k, v in defaults.items() if k not in saved_group and not isinstance(v, bool) and v is not None
    )


def check_fits(path: Path, optimizer: Any, saved: Any, *, part: str = "optimizer") -> None:
    """Refuse a saved optimizer state that ``optimizer.load_state_dict`` would take but that does not fit.

    Checks the structure, the number of groups and of parameters per group,
    the hyper-parameters (a saved Adam group has no ``momentum`` for an
    SGD), and the shape of every saved state tensor against its parameter.

    Raises:
        CheckpointMismatchError: the first thing that does not fit, named.
    """
    why = problem(saved)
    if why is not None:
        raise CheckpointMismatchError(
            path,
            part,
            f"the saved {part} state {why}",
            f"restore without {part}= (it is not one torch writes)",
        )
    groups = optimizer.param_groups
    saved_groups = saved["param_groups"]
    if len(groups) != len(saved_groups):
        raise CheckpointMismatchError(
            path,
            part,
            f"it has {len(saved_groups)} parameter group(s), the optimizer has {len(groups)}",
            "build the optimizer with the same param groups as the run that saved it "
            "(e.g. the same torchkeep.param_groups(...) call)",
        )
    saved_class = guess_class(saved)
    for index, (group, saved_group) in enumerate(zip(groups, saved_groups, strict=True)):
        if len(group["params"]) != len(saved_group.get("params", [])):
            raise CheckpointMismatchError(
                path,
                part,
                f"parameter group {index} holds {len(saved_group.get('params', []))} parameters in the "
                f"checkpoint and {len(group['params'])} in the optimizer",
                "build the optimizer over the same parameters (same frozen/trainable split) as when saving",
            )
        missing = _hyper_keys_missing(optimizer, saved_group)
        if missing:
            raise CheckpointMismatchError(
                path,
                part,
                f"the saved state is {describe(saved)}; its parameter group {index} has no "
                f"{', '.join(missing)}, which {type(optimizer).__name__} needs",
                f"restore it into a {saved_class} optimizer, or pick the saved state that belongs to "
                f"this {type(optimizer).__name__}",
            )
        if type(optimizer).__name__ == "LBFGS":
            continue
        for position, (param, pid) in enumerate(zip(group["params"], saved_group["params"], strict=True)):
            entry = saved["state"].get(pid) if isinstance(pid, int | str) else None
            for key, value in (entry or {}).items():
                if key in _UNSHAPED or not isinstance(value, torch.Tensor) or value.ndim == 0:
                    continue
                if tuple(value.shape) != tuple(param.shape):
                    raise CheckpointMismatchError(
                        path,
                        part,
                        f"the saved {key!r} of parameter {position} in group {index} has shape "
                        f"{tuple(value.shape)}, the parameter has shape {tuple(param.shape)} "
                        f"(saved: {describe(saved)})",
                        "build the optimizer over the same parameters, in the same order, as the run "
                        "that saved it, or pick the saved state that belongs to this optimizer",
                    )


def choose(
    path: Path, part: str, given: Any, saved: Sequence[Any], index: int | None
) -> list[tuple[str, Any, Any]]:
    """Pair the objects given (one, or a list/tuple) with the saved states, by position or ``index``.

    Returns:
        ``(name, object, saved state)`` for each object given: the name is
        ``part`` for one object and ``part[i]`` for a list.

    Raises:
        CheckpointMismatchError: several saved states and one object with no
            index, an index out of range, or a list of another length; the
            message lists what the file holds.
    """
    listing = "; ".join(f"[{i}] {describe(s)}" for i, s in enumerate(saved)) or "none"
    if isinstance(given, list | tuple):
        if index is not None:
            raise CheckpointMismatchError(
                path, part, f"{part}_index= picks one saved state but a list was given", f"pass one {part}"
            )
        if len(given) != len(saved):
            raise CheckpointMismatchError(
                path,
                part,
                f"{len(given)} {part}s were given and the checkpoint holds {len(saved)} {part} "
                f"state(s): {listing}",
                f"pass {len(saved)} {part}s in the order the run that saved them created them, or one "
                f"{part} with {part}_index=",
            )
        return [(f"{part}[{i}]", obj, s) for i, (obj, s) in enumerate(zip(given, saved, strict=True))]
    if index is not None:
        if type(index) is not int or not 0 <= index < len(saved):
            raise CheckpointMismatchError(
                path,
                part,
                f"{part}_index={index!r} but the checkpoint holds {len(saved)} {part} state(s): {listing}",
                f"pass {part}_index= between 0 and {len(saved) - 1}",
            )
        return [(part, given, saved[index])]
    if len(saved) > 1:
        raise CheckpointMismatchError(
            path,
            part,
            f"the checkpoint holds {len(saved)} {part} states and it is ambiguous which one is meant: "
            f"{listing}",
            f"pass {part}_index=<i> to pick one, or a list of {len(saved)} {part}s to restore all",
        )
    return [(part, given, saved[0] if saved else None)]

"""Putting saved states into live objects: every check first, then the loads.

Used by :func:`torchkeep.load_checkpoint` and by run-folder restores. An
object restored through ``load_state_dict`` may also define
``check_state_dict(state) -> None``, which raises (a typed error, with the fix)
when the state does not fit and changes nothing: :func:`check_states` calls it
for every object before the first one is loaded, so a state that
``load_state_dict`` would refuse half-way leaves every object as it was.
:class:`torchkeep.EMA` defines it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torchkeep.errors import CheckpointMismatchError, RngRestoreWarning, TorchkeepError, first_line
from torchkeep.layouts import Saved
from torchkeep.layouts.optimizers import check_fits
from torchkeep.load_report import LoadReport
from torchkeep.loading import load_into
from torchkeep.rng import restore_rng_state

__all__ = ["apply_states", "check_states", "restore_saved_rng"]


def _is_optimizer(name: str) -> bool:
    return name == "optimizer" or name.startswith("optimizer[")


def apply_states(
    path: Path,
    parts: Mapping[str, Any],
    given: Mapping[str, Any],
    *,
    strict: bool,
    available: list[str],
    absent: Mapping[str, str] | None = None,
) -> tuple[list[str], LoadReport | None]:
    """Load saved states into the given objects, after checking that everything fits.

    ``parts`` maps a name (``"model"``, ``"optimizer"``, ``"optimizer[1]"``, a
    stateful's name) to its saved state (``None`` when absent); ``given``
    maps names to the objects to restore (``None`` to skip). The model goes
    through :func:`load_into`, the rest through ``load_state_dict``. Every
    check that can fail runs before the first object changes (see
    :func:`check_states`).

    Args:
        available: the checkpoint's entries, named when a part is absent.
        absent: per part, why an entry that looks like it could not be used
            (said instead of "holds no … state").

    Returns:
        The names restored, and the model's :class:`LoadReport` (if a model was given).

    Raises:
        CheckpointMismatchError: a state is absent, or an object refuses it.
        KeyMismatchError: the model (or an object's own check) finds other keys or shapes.
    """
    check_states(path, parts, given, available=available, absent=absent)
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


def check_states(
    path: Path,
    parts: Mapping[str, Any],
    given: Mapping[str, Any],
    *,
    available: list[str],
    absent: Mapping[str, str] | None = None,
) -> None:
    """Every check :func:`apply_states` makes before it changes anything; changes nothing itself.

    Each given object must have its saved state; optimizers are compared with
    theirs by :func:`torchkeep.layouts.optimizers.check_fits` (groups,
    hyper-parameters, every state tensor's shape); any other object that
    defines ``check_state_dict(state)`` is asked whether its state fits. The
    model is checked by :func:`load_into` itself, which loads nothing when it
    refuses, and is the first object loaded.

    Args:
        path: the checkpoint, named in the errors.
        parts: name -> saved state (``None`` when absent).
        given: name -> the object to restore (``None`` to skip).
        available: the checkpoint's entries, named when a part is absent.
        absent: per part, why an entry that looks like it could not be used.

    Raises:
        CheckpointMismatchError: a state is absent, or does not fit its object
            (an object's own check raising something other than a torchkeep error).
        TorchkeepError: an object's ``check_state_dict`` refused its state (as it raised it).
    """
    for name, obj in given.items():
        if obj is not None and parts.get(name) is None:
            why = (absent or {}).get(name.split("[")[0])
            reason = (
                f"the checkpoint holds no usable {name} state: {why}"
                if why
                else f"the checkpoint holds no {name} state (it has: {', '.join(available) or 'nothing'})"
            )
            raise CheckpointMismatchError(path, name, reason, f"restore without {name}=")
    for name, obj in given.items():
        if obj is None or name == "model":
            continue
        if _is_optimizer(name):
            check_fits(path, obj, parts[name], part=name)
            continue
        check = getattr(obj, "check_state_dict", None)
        if not callable(check):
            continue
        try:
            check(parts[name])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as err:
            if isinstance(err, TorchkeepError):
                raise
            raise CheckpointMismatchError(
                path,
                name,
                "its check_state_dict refused the saved state "
                f"({type(err).__name__}: {first_line(err)[:200]})",
                f"restore without {name}=, or build the {name} as the run that saved it did",
            ) from err


def restore_saved_rng(path: Path, saved: Saved) -> list[str]:
    """Restore the RNG state ``saved`` holds; warn (and return nothing) when it holds none.

    Raises:
        CheckpointMismatchError: the saved state cannot be restored.
    """
    if saved.rng is None:
        why = saved.absent.get("rng") or "; ".join(n for n in saved.skipped if "RNG" in n or "random" in n)
        warnings.warn(
            f"{path} holds no RNG state torchkeep can restore{f' ({why})' if why else ''}; "
            "random streams were not restored",
            RngRestoreWarning,
            stacklevel=4,
        )
        return []
    try:
        restore_rng_state(saved.rng)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as err:
        if isinstance(err, TorchkeepError):
            raise
        raise CheckpointMismatchError(
            path,
            "rng",
            f"the saved RNG state cannot be restored ({type(err).__name__}: {first_line(err)[:200]})",
            "pass restore_rng=False",
        ) from err
    return ["rng"]

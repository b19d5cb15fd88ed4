"""Single-file checkpoint layouts: one table, one reader per layout.

A layout is recognised from the keys of the dict the file holds, in the
order of :data:`LAYOUTS` (the first that matches wins):

=============  ==========================================================
``torchkeep``  :func:`torchkeep.save_checkpoint` (a ``torchkeep`` entry)
``lightning``  Lightning ``.ckpt`` (``optimizer_states``, ``pytorch-lightning_version``)
``classic``    hand-written ``{"model_state_dict": ..., "optimizer_state_dict": ...}``
``timm``       timm's ``CheckpointSaver`` (``state_dict`` with ``saver`` or ``version``)
``imagenet``   pytorch/examples ImageNet (``state_dict`` with ``arch``/``optimizer``/``epoch``)
``optimizer``  a bare ``optimizer.state_dict()`` (HF Trainer's ``optimizer.pt``)
``weights``    anything else: a state dict
=============  ==========================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import NotAStateDictError
from torchkeep.layouts.optimizers import is_optimizer_state, problem
from torchkeep.layouts.saved import HYPER_PARAMETER_KEYS, Saved
from torchkeep.safety.allowlist import brief

__all__ = ["LAYOUTS", "placeholder_keys", "read_dict"]

_CLASSIC = {
    "model": ("model_state_dict",),
    "optimizer": ("optimizer_state_dict",),
    "scheduler": ("scheduler_state_dict",),
    "scaler": ("scaler_state_dict",),
}
_IMAGENET = {
    "model": ("state_dict",),
    "optimizer": ("optimizer",),
    "scheduler": ("scheduler", "lr_scheduler"),
    "scaler": ("amp_scaler", "scaler"),
}
_IMAGENET_METRICS = ("best_acc1", "best_acc5", "acc1", "metric", "best_metric")


def _malformed(path: Path, layout: str, what: str, expected: str) -> NotAStateDictError:
    return NotAStateDictError(
        path,
        f"a {layout} checkpoint whose {what}",
        hint=f"a readable checkpoint has {expected}; the file was not written by save_checkpoint or "
        f"{layout} as it is (load its weights alone with torchkeep.load_weights(path, key=...))",
    )


def _check_types(path: Path, content: Mapping[str, Any], layout: str, mappings: tuple[str, ...]) -> None:
    """Refuse, before anything is restored, entries whose type no writer of ``layout`` produces.

    Raises:
        NotAStateDictError: e.g. ``metrics`` that is not a dict, a ``loss`` of several values.
    """
    for name in (*mappings, "metrics", "extra"):
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


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _by_names(saved: Saved, content: Mapping[str, Any], names: Mapping[str, tuple[str, ...]]) -> None:
    """Fill the parts from the first present key of each; note entries that are there but unusable."""
    for part, keys in names.items():
        key = next((k for k in keys if content.get(k) is not None), None)
        if key is None:
            continue
        value = content[key]
        if part == "model":
            saved.model = value
        elif part == "optimizer":
            why = problem(value)
            if why is None:
                saved.optimizers = [value]
            else:
                saved.absent["optimizer"] = f"its entry {key!r} {why}"
        elif part == "scheduler":
            if isinstance(value, Mapping):
                saved.schedulers = [value]
            else:
                saved.absent["scheduler"] = f"its entry {key!r} is {brief(value)}, not a scheduler state dict"
        else:
            saved.scaler = value


def _classic(path: Path, content: Mapping[str, Any], layout: str) -> Saved:
    _check_types(path, content, layout, tuple(k for keys in _CLASSIC.values() for k in keys))
    saved = Saved(layout)
    _by_names(saved, content, _CLASSIC)
    rng = content.get("rng_state")
    saved.rng = dict(rng) if isinstance(rng, Mapping) else None
    if rng is not None and not isinstance(rng, Mapping):
        saved.absent["rng"] = f"its 'rng_state' is {brief(rng)}, not the dict save_checkpoint writes"
    saved.epoch, saved.step, saved.loss = content.get("epoch"), content.get("step"), content.get("loss")
    saved.metrics, saved.extra = _dict(content.get("metrics")), _dict(content.get("extra"))
    saved.hyper_parameters = {k: v for k, v in content.items() if k in HYPER_PARAMETER_KEYS}
    return saved


def _lightning(path: Path, content: Mapping[str, Any], layout: str) -> Saved:
    for name in ("optimizer_states", "lr_schedulers"):
        value = content.get(name)
        if value is not None and not (
            isinstance(value, list | tuple) and all(v is None or isinstance(v, Mapping) for v in value)
        ):
            raise _malformed(path, layout, f"{name!r} is a {type(value).__name__}", "a list of dicts there")
    _check_types(path, content, layout, ("state_dict", "native_amp_scaling_state", "callbacks", "loops"))
    saved = Saved(layout, model=content.get("state_dict"), scaler=content.get("native_amp_scaling_state"))
    saved.optimizers = [s for s in content.get("optimizer_states") or [] if s is not None]
    saved.schedulers = [s for s in content.get("lr_schedulers") or [] if s is not None]
    saved.epoch, saved.step = content.get("epoch"), content.get("global_step")
    hparams = content.get("hyper_parameters")
    # a config object saved whole (omegaconf's DictConfig, a placeholder) keeps its own key
    saved.hyper_parameters = (
        _dict(hparams) if isinstance(hparams, Mapping) or hparams is None else {"hyper_parameters": hparams}
    )
    for key in ("datamodule_hyper_parameters", "hparams_name", "datamodule_hparams_name", "hparams_type"):
        if key in content:
            saved.extra[key] = content[key]
    saved.callbacks = _dict(content.get("callbacks"))
    saved.loops = _dict(content.get("loops"))
    for state in saved.callbacks.values():
        if isinstance(state, Mapping) and "best_model_path" in state:  # ModelCheckpoint
            score = state.get("best_model_score")
            if isinstance(score, torch.Tensor) and score.numel() == 1:
                saved.best_metric = float(score.item())
            elif isinstance(score, int | float) and not isinstance(score, bool):
                saved.best_metric = float(score)
            best = state.get("best_model_path")
            saved.best_checkpoint = best if isinstance(best, str) and best else None
            break
    used = {"state_dict", "optimizer_states", "lr_schedulers", "native_amp_scaling_state", "epoch"}
    used |= {"global_step", "hyper_parameters", "callbacks", "loops"}
    saved.extra.update({k: v for k, v in content.items() if k not in used and k not in saved.extra})
    return saved


def _imagenet(path: Path, content: Mapping[str, Any], layout: str) -> Saved:
    _check_types(path, content, layout, ("state_dict",))
    saved = Saved(layout)
    _by_names(saved, content, _IMAGENET)
    saved.epoch = content.get("epoch")
    saved.hyper_parameters = {k: v for k, v in content.items() if k in HYPER_PARAMETER_KEYS}
    for key in _IMAGENET_METRICS:
        value = content.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value.item())
        if isinstance(value, int | float) and not isinstance(value, bool):
            saved.metrics[key] = value
    saver = content.get("saver")
    if isinstance(saver, Mapping) and isinstance(saver.get("best_metric"), int | float):
        saved.best_metric = float(saver["best_metric"])
    used = {k for keys in _IMAGENET.values() for k in keys} | {
        "epoch",
        *saved.hyper_parameters,
        *saved.metrics,
    }
    saved.extra = {k: v for k, v in content.items() if k not in used}
    return saved


def _optimizer(path: Path, content: Mapping[str, Any], layout: str) -> Saved:
    return Saved(layout, optimizers=[content])


def _weights(path: Path, content: Mapping[str, Any], layout: str) -> Saved:
    return Saved(layout, model=content)


def _is_imagenet(content: Mapping[str, Any]) -> bool:
    return isinstance(content.get("state_dict"), Mapping) and bool(
        {"arch", "optimizer", "epoch"} & set(content)
    )


Reader = Callable[[Path, Mapping[str, Any], str], Saved]

#: (layout, does the dict look like it, its reader): the first match wins.
LAYOUTS: tuple[tuple[str, Callable[[Mapping[str, Any]], bool], Reader], ...] = (
    ("torchkeep", lambda c: "torchkeep" in c, _classic),
    ("lightning", lambda c: "optimizer_states" in c or "pytorch-lightning_version" in c, _lightning),
    ("classic", lambda c: "model_state_dict" in c, _classic),
    ("timm", lambda c: _is_imagenet(c) and ("saver" in c or c.get("version") == 2), _imagenet),
    ("imagenet", _is_imagenet, _imagenet),
    ("optimizer", lambda c: set(c) == {"state", "param_groups"} and is_optimizer_state(c), _optimizer),
    ("weights", lambda c: True, _weights),
)

# where each layout may hold objects that need code (returned as inert placeholders)
PLACEHOLDER_KEYS: dict[str, frozenset[str]] = {
    "torchkeep": frozenset(),
    "optimizer": frozenset(),
    "weights": frozenset(),
}


def read_dict(path: Path, content: Mapping[str, Any]) -> Saved:
    """The parts of a checkpoint dict, by the first layout of :data:`LAYOUTS` it matches.

    Raises:
        NotAStateDictError: an entry of a type no writer of that layout produces.
    """
    layout, _, reader = next(entry for entry in LAYOUTS if entry[1](content))  # "weights" matches all
    saved = reader(path, content, layout)
    saved.entries = [str(k) for k in content]
    return saved


def placeholder_keys(layout: str) -> frozenset[str]:
    """The top-level entries of a ``layout`` file where inert placeholders may be."""
    return PLACEHOLDER_KEYS.get(layout, HYPER_PARAMETER_KEYS)

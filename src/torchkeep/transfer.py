"""Freezing done right: requires_grad, normalization statistics, and the optimizer.

Setting ``requires_grad = False`` does not stop BatchNorm from updating its
running statistics in ``model.train()``, so a "frozen" backbone still drifts.
``freeze`` (with ``bn="eval"``, the default) also keeps frozen normalization
layers in eval mode during forward passes until they are unfrozen.
"""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from torchkeep.errors import NoMatchError

__all__ = ["FreezeReport", "freeze", "param_groups", "refresh_optimizer", "trainable", "unfreeze"]

Target = str | type[nn.Module] | nn.Module

# frozen normalization layer -> its hook; weak, so models stay picklable and collectable
_EVAL_HOOKS: weakref.WeakKeyDictionary[nn.Module, RemovableHandle] = weakref.WeakKeyDictionary()
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    _BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@dataclass(frozen=True)
class FreezeReport:
    """How many parameters (elements) are frozen and trainable after a freeze or unfreeze.

    Attributes:
        frozen: elements of parameters that do not require grad.
        trainable: elements of parameters that do.
        changed: names of the parameters this call changed.
        eval_norm_layers: names of normalization layers held in eval mode.
    """

    frozen: int
    trainable: int
    changed: tuple[str, ...]
    eval_norm_layers: tuple[str, ...]

    def __str__(self) -> str:
        total = self.frozen + self.trainable
        share = 100.0 * self.trainable / total if total else 0.0
        text = (
            f"{self.trainable:,} of {total:,} parameter elements trainable ({share:.1f}%), "
            f"{self.frozen:,} frozen"
        )
        if self.eval_norm_layers:
            text += f"; {len(self.eval_norm_layers)} frozen normalization layer(s) held in eval mode"
        return text


def _hold_eval(module: nn.Module, args: Any) -> None:
    module.training = False  # running statistics stay as they are while the layer is frozen


def _resolve(model: nn.Module, targets: Sequence[Target]) -> tuple[set[str], set[str]]:
    """Parameter names and module names that the targets select."""
    names = dict(model.named_modules())
    ids = {id(m): n for n, m in names.items()}
    params: set[str] = set()
    modules: set[str] = set()

    def take_module(prefix: str) -> None:
        for sub, _ in names[prefix].named_modules(prefix=prefix):
            modules.add(sub)
        params.update(n for n, _ in names[prefix].named_parameters(prefix=prefix))

    for target in targets or [""]:
        if isinstance(target, nn.Module):
            if id(target) not in ids:
                raise NoMatchError(target, "that module is not part of the model")
            take_module(ids[id(target)])
        elif isinstance(target, type):
            matched = [n for n, m in names.items() if isinstance(m, target)]
            if not matched:
                raise NoMatchError(target, f"the model has no {target.__name__} layer")
            for n in matched:
                take_module(n)
        elif target in names:
            take_module(target)
        else:
            matched = [n for n, _ in model.named_parameters() if fnmatch.fnmatchcase(n, target)]
            if not matched:
                close = [n for n in names if n and target.split(".")[0] in n][:5]
                raise NoMatchError(target, f"no submodule or parameter name matches it (similar: {close})")
            params.update(matched)
            for n in matched:
                modules.add(n.rpartition(".")[0])
    return params, modules


def _report(model: nn.Module, changed: Iterable[str]) -> FreezeReport:
    frozen = trainable = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    held = tuple(n for n, m in model.named_modules() if m in _EVAL_HOOKS)
    return FreezeReport(frozen, trainable, tuple(changed), held)


def freeze(module: nn.Module, *targets: Target, bn: str = "eval") -> FreezeReport:
    """Stop training parameters: the whole module, or the targets in it.

    Args:
        module (nn.Module): the model.
        *targets (str | type | nn.Module): submodule names (``"features"``),
            glob patterns over parameter names (``"layer4.*"``), module types
            (``nn.BatchNorm2d``) or submodules; none means everything.
        bn (str, default "eval"): ``"eval"`` keeps frozen normalization layers
            (and their running statistics) in eval mode even in
            ``model.train()``, until unfrozen; ``"train"`` leaves normalization
            layers trainable, like fastai's ``train_bn``.

    Returns:
        A :class:`FreezeReport`.

    Raises:
        NoMatchError: a target matches nothing.

    Example:
        >>> torchkeep.freeze(model)                  # everything ...
        >>> torchkeep.unfreeze(model, "classifier")  # ... but the head
    """
    if bn not in ("eval", "train"):
        raise ValueError(f"bn must be 'eval' or 'train', got {bn!r}")
    params, modules = _resolve(module, targets)
    named = dict(module.named_modules())
    norm_params = {
        f"{n}.{p}" if n else p
        for n in modules
        if isinstance(named[n], _NORM_TYPES)
        for p, _ in named[n].named_parameters(recurse=False)
    }
    changed = []
    for name, param in module.named_parameters():
        if name in params and not (bn == "train" and name in norm_params) and param.requires_grad:
            param.requires_grad_(False)
            changed.append(name)
    if bn == "eval":
        for name in modules:
            layer = named[name]
            if isinstance(layer, _BatchNorm) and layer not in _EVAL_HOOKS:
                _EVAL_HOOKS[layer] = layer.register_forward_pre_hook(_hold_eval)
                layer.training = False
    return _report(module, changed)


def unfreeze(module: nn.Module, *targets: Target) -> FreezeReport:
    """Train parameters again: the whole module, or the targets in it (same forms as :func:`freeze`).

    Normalization layers among the targets leave eval mode and follow the
    model's mode again. Add the parameters to your optimizer with
    :func:`refresh_optimizer` (an optimizer built before does not see them).

    Args:
        module (nn.Module): the model.
        *targets (str | type | nn.Module): what to unfreeze; none means everything.

    Returns:
        A :class:`FreezeReport`.

    Raises:
        NoMatchError: a target matches nothing.

    Example:
        >>> torchkeep.unfreeze(model, "layer4.*", "fc")
    """
    params, modules = _resolve(module, targets)
    named = dict(module.named_modules())
    changed = []
    for name, param in module.named_parameters():
        if name in params and not param.requires_grad:
            param.requires_grad_(True)
            changed.append(name)
    for name in modules:
        handle = _EVAL_HOOKS.pop(named[name], None)
        if handle is not None:
            handle.remove()
            named[name].training = module.training
    return _report(module, changed)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (each once, tied ones too).

    Example:
        >>> optimizer = torch.optim.AdamW(torchkeep.trainable(model), lr=1e-3)
    """
    return [p for p in model.parameters() if p.requires_grad]


def _is_no_decay(name: str, owner: nn.Module, tokens: Sequence[str]) -> bool:
    leaf = name.rpartition(".")[2]
    for token in tokens:
        if token == "bias" and leaf == "bias":
            return True
        if token == "norm" and isinstance(owner, _NORM_TYPES):
            return True
        if token not in ("bias", "norm") and token in name:
            return True
    return False


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    backbone_lr: float | None = None,
    head: Target | Sequence[Target] | None = None,
    weight_decay: float = 0.0,
    no_decay: Sequence[str] = ("bias", "norm"),
) -> list[dict[str, Any]]:
    """Optimizer parameter groups of the trainable parameters only.

    Args:
        model (nn.Module): the model.
        lr (float): the learning rate (of the head, when ``backbone_lr`` is given).
        backbone_lr (float | None, default None): a learning rate for every
            trainable parameter outside ``head``.
        head (str | type | nn.Module | Sequence | None, default None): what is
            the head (same forms as :func:`freeze` targets); needed with ``backbone_lr``.
        weight_decay (float, default 0.0): weight decay, except for ``no_decay``.
        no_decay (Sequence[str], default ("bias", "norm")): no weight decay for
            biases, parameters of normalization layers, and names containing
            any other token listed.

    Returns:
        A list of dicts for ``torch.optim`` (``params``, ``lr``,
        ``weight_decay``, ``name``); empty groups are left out.

    Raises:
        ValueError: ``backbone_lr`` without ``head``.
        NoMatchError: ``head`` matches nothing.

    Example:
        >>> groups = torchkeep.param_groups(model, lr=1e-3, backbone_lr=1e-4, head="fc", weight_decay=0.05)
        >>> optimizer = torch.optim.AdamW(groups)
    """
    if backbone_lr is not None and head is None:
        raise ValueError("backbone_lr needs head=... (e.g. head='fc') to tell the head from the backbone")
    head_targets: Sequence[Target] = (
        [] if head is None else list(head) if isinstance(head, list | tuple) else [head]  # type: ignore[list-item]
    )
    head_params = _resolve(model, head_targets)[0] if head_targets else set()
    owners = dict(model.named_modules())
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        part = "head" if (backbone_lr is None or name in head_params) else "backbone"
        decays = not _is_no_decay(name, owners[name.rpartition(".")[0]], no_decay)
        groups.setdefault((part, decays), []).append(param)
    result = []
    for (part, decays), params in groups.items():
        result.append(
            {
                "params": params,
                "lr": lr if part == "head" else backbone_lr,
                "weight_decay": weight_decay if decays else 0.0,
                "name": f"{'all' if backbone_lr is None else part}{'' if decays else ' (no decay)'}",
            }
        )
    return result


def refresh_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, **group_options: Any) -> int:
    """Add the model's trainable parameters that the optimizer does not hold yet.

    They join as one new parameter group (hyper-parameters of the first group,
    overridden by ``group_options``, e.g. ``lr=1e-4``); existing groups and
    their state (momentum, Adam moments) are untouched.

    Args:
        optimizer (torch.optim.Optimizer): the optimizer.
        model (nn.Module): the model whose parameters were unfrozen.
        **group_options: settings of the new group.

    Returns:
        The number of parameters added (0 when there was nothing to add).

    Example:
        >>> torchkeep.unfreeze(model, "layer4")
        >>> torchkeep.refresh_optimizer(optimizer, model, lr=1e-4)
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    new = [p for p in trainable(model) if id(p) not in held]
    if new:
        options = {k: v for k, v in optimizer.param_groups[0].items() if k not in ("params", "name")}
        options.update(group_options)
        optimizer.add_param_group({"params": new, **options})
    return len(new)

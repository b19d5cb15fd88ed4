"""The check of what a pickle built: only data (plain values, containers, tensors), no cycles."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import LimitExceededError, UnsafeFileError
from torchkeep.safety.allowlist import Builder, StorageType, TypeMarker, is_plain_value
from torchkeep.safety.limits import Limits
from torchkeep.safety.opaque import Opaque

__all__ = ["check_structure"]


def check_structure(value: Any, *, path: Path, limits: Limits, opaque: bool = False) -> None:
    """Walk what a pickle built: only plain values, containers and tensors; no cycles; bounded depth.

    With ``opaque`` the :class:`Opaque` placeholders of opaque mode pass too
    (what they hold is walked like any container, and a reference back to a
    placeholder, such as an omegaconf node's ``_parent``, is no cycle error);
    the caller then decides where they may be.

    Raises:
        UnsafeFileError: a leftover function or storage object, or a cycle.
        LimitExceededError: nesting deeper than ``limits.max_depth``.
    """
    # Depth-first with one iterator per level: memory is O(max_depth) whatever the
    # number of references, and each container is entered once.
    if not _is_container(value, opaque):
        _check_leaf(value, path)
        return
    done: set[int] = set()
    on_path = {id(value)}
    stack: list[tuple[Any, Iterator[Any]]] = [(value, _children(value))]
    while stack:
        obj, children = stack[-1]
        for child in children:
            if isinstance(child, torch.Tensor) or is_plain_value(child):
                continue
            if not _is_container(child, opaque):
                _check_leaf(child, path)
            cid = id(child)
            if cid in on_path:
                if opaque and type(child) is Opaque:
                    continue  # a placeholder's state naming its parent (omegaconf nodes do): inert data
                raise UnsafeFileError(
                    path, reason="builds a container that contains itself (a reference cycle)"
                )
            if cid in done:
                continue
            if len(stack) >= limits.max_depth:
                raise LimitExceededError(
                    path, "max_depth", len(stack) + 1, limits.max_depth, what="the nesting of values"
                )
            on_path.add(cid)
            stack.append((child, _children(child)))
            break
        else:
            stack.pop()
            on_path.discard(id(obj))
            done.add(id(obj))


def _is_container(value: Any, opaque: bool) -> bool:
    return isinstance(value, dict | list | tuple | set | frozenset) or (opaque and type(value) is Opaque)


def _children(obj: Any) -> Iterator[Any]:
    if type(obj) is Opaque:
        return obj.parts()
    if isinstance(obj, dict):
        return itertools.chain(obj.keys(), obj.values(), getattr(obj, "__dict__", {}).values())
    return iter(obj)


def _check_leaf(obj: Any, path: Path) -> None:
    if isinstance(obj, torch.Tensor) or is_plain_value(obj):
        return
    what = obj.name if isinstance(obj, Builder | TypeMarker | StorageType) else type(obj).__name__
    raise UnsafeFileError(
        path, reason=f"holds a {what} object itself rather than data built from it (not a tensor file)"
    )

"""Which tensors differ between two sets of weights: the check that a frozen backbone stayed frozen."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchkeep._table import format_table
from torchkeep.loading import tied_keys
from torchkeep.weights import load_weights, to_state_dict

__all__ = ["TensorChange", "WeightsDiff", "diff"]

Source = nn.Module | str | os.PathLike[str] | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class TensorChange:
    """One tensor present in both, with different content.

    Attributes:
        key: its name.
        max_abs_diff: the largest absolute difference (``inf`` when shapes or dtypes differ).
        detail: what differs, in words.
    """

    key: str
    max_abs_diff: float
    detail: str


@dataclass(frozen=True)
class WeightsDiff:
    """The result of :func:`diff`.

    Attributes:
        changed: tensors in both that differ.
        same: names of tensors in both that are equal (within ``atol``).
        only_a: names only in the first.
        only_b: names only in the second.
        tied: ``name -> twin`` for names in one side only that are, on that
            side, the same tensor as a twin the other side has too (tied
            weights that one writer stores once, e.g. GPT-2's ``lm_head.weight``
            as ``transformer.wte.weight``); compared through the twin.
    """

    changed: tuple[TensorChange, ...]
    same: tuple[str, ...]
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    tied: dict[str, str] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        """True when both hold the same tensors under the same names (a tied name counts as its twin)."""
        return not (self.changed or self.only_a or self.only_b)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, e.g. for JSON."""
        return {
            "changed": [
                {"key": c.key, "max_abs_diff": c.max_abs_diff, "detail": c.detail} for c in self.changed
            ],
            "same": list(self.same),
            "only_a": list(self.only_a),
            "only_b": list(self.only_b),
            "tied": dict(self.tied),
        }

    def __str__(self) -> str:
        head = (
            f"{len(self.same)} equal, {len(self.changed)} changed, "
            f"{len(self.only_a)} only in A, {len(self.only_b)} only in B"
        )
        if self.tied:
            head += f", {len(self.tied)} tied (one tensor under two names on one side)"
        rows = [("changed", c.key, c.detail) for c in self.changed]
        rows += [("tied", k, f"the same tensor as {twin} on its side") for k, twin in self.tied.items()]
        rows += [("only in A", k, "") for k in self.only_a]
        rows += [("only in B", k, "") for k in self.only_b]
        return head if not rows else head + "\n" + format_table(("status", "key", "detail"), rows)


def _state(source: Source) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module | Mapping):
        return to_state_dict(source)
    return load_weights(source)


def _compare(a: torch.Tensor, b: torch.Tensor, atol: float) -> TensorChange | None:
    if a.shape != b.shape:
        return TensorChange("", float("inf"), f"shape {list(a.shape)} vs {list(b.shape)}")
    if a.dtype != b.dtype:
        return TensorChange("", float("inf"), f"dtype {a.dtype} vs {b.dtype}")
    if torch.equal(a, b):
        return None
    if a.dtype == torch.bool or not (a.is_floating_point() or a.is_complex() or a.dtype.is_signed):
        a, b = a.long(), b.long()
    delta = float((a.double() - b.double()).abs().max().item()) if a.numel() else 0.0
    if delta <= atol:
        return None
    return TensorChange("", delta, f"max abs diff {delta:.3g}")


def diff(a: Source, b: Source, *, atol: float = 0.0) -> WeightsDiff:
    """Compare two sets of weights tensor by tensor.

    Args:
        a, b (nn.Module | str | PathLike | Mapping[str, Tensor]): models, state
            dicts, or any files :func:`load_weights` reads.
        atol (float, default 0.0): differences up to this count as equal.

    Returns:
        A :class:`WeightsDiff`; ``print()`` shows the changed keys.

    Example:
        >>> d = torchkeep.diff("before.safetensors", "after.safetensors")
        >>> assert not any(c.key.startswith("features.") for c in d.changed)
    """
    sa, sb = _state(a), _state(b)
    changed, same = [], []
    for key in sa:
        if key not in sb:
            continue
        change = _compare(sa[key].detach().cpu(), sb[key].detach().cpu(), atol)
        if change is None:
            same.append(key)
        else:
            changed.append(TensorChange(key, change.max_abs_diff, change.detail))
    tied = {**_tied_aliases(sa, sb), **_tied_aliases(sb, sa)}
    return WeightsDiff(
        changed=tuple(changed),
        same=tuple(same),
        only_a=tuple(k for k in sa if k not in sb and k not in tied),
        only_b=tuple(k for k in sb if k not in sa and k not in tied),
        tied=tied,
    )


def _tied_aliases(side: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``name -> twin`` for names of ``side`` missing from ``other`` whose tensor is a twin's that is not."""
    aliases: dict[str, str] = {}
    for keys in tied_keys(side):
        present = [k for k in keys if k in other]
        if present:
            aliases.update({k: present[0] for k in keys if k not in other})
    return aliases

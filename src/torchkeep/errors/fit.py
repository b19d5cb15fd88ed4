"""Errors of the group :class:`DoesNotFitError`: the file does not fit the model or objects given."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torchkeep.errors._base import _LIST_LIMIT, DoesNotFitError, _short_list

__all__ = [
    "BaseMismatchError",
    "CheckpointMismatchError",
    "IncompatibleSourcesError",
    "KeyMismatchError",
    "NoMatchError",
    "ShapeMismatch",
]


@dataclass(frozen=True)
class ShapeMismatch:
    """A key present in both the file and the model, with different shapes.

    Attributes:
        key: the model's key.
        file_shape: the shape in the file.
        model_shape: the shape in the model.
    """

    key: str
    file_shape: tuple[int, ...]
    model_shape: tuple[int, ...]

    def describe(self) -> str:
        """One line: ``size mismatch for fc.weight: file [1000, 512], model [10, 512]``."""
        return f"size mismatch for {self.key}: file {list(self.file_shape)}, model {list(self.model_shape)}"


class KeyMismatchError(DoesNotFitError, RuntimeError):
    """A state dict does not fit the model it is loaded into.

    Attributes:
        missing: model keys the file does not have.
        unexpected: file keys the model does not have.
        mismatched: keys whose shapes differ.
        loaded: how many tensors matched.

    Example:
        >>> try:
        ...     torchkeep.load_into(model, "imagenet.pt")
        ... except torchkeep.KeyMismatchError as err:
        ...     print(err.mismatched)
    """

    def __init__(
        self,
        *,
        model_name: str,
        missing: Sequence[str],
        unexpected: Sequence[str],
        mismatched: Sequence[ShapeMismatch],
        loaded: int,
        hint: str,
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        self.loaded = loaded
        lines = [
            f"state dict does not fit {model_name}: {loaded} matching, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} with another shape"
        ]
        if self.missing:
            lines.append(f"  missing (in the model, not in the file): {_short_list(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (in the file, not in the model): {_short_list(self.unexpected)}")
        lines.extend(f"  {m.describe()}" for m in self.mismatched[:_LIST_LIMIT])
        if len(self.mismatched) > _LIST_LIMIT:
            lines.append(f"  … ({len(self.mismatched) - _LIST_LIMIT} more with another shape)")
        lines.append(f"fix: {hint}")
        super().__init__("\n".join(lines))


class CheckpointMismatchError(DoesNotFitError, ValueError):
    """A checkpoint's content does not fit the objects passed to restore it.

    Attributes:
        path: the checkpoint.
        part: which part does not fit (``"optimizer"``, ``"scheduler"``, …).
    """

    def __init__(self, path: Path, part: str, reason: str, fix: str) -> None:
        self.path = path
        self.part = part
        super().__init__(f"{path}: the {part} does not fit: {reason}; {fix}.")


class NoMatchError(DoesNotFitError, ValueError):
    """A freeze/unfreeze/head target matches nothing in the model.

    Attributes:
        target: the target as given.
    """

    def __init__(self, target: object, reason: str) -> None:
        self.target = target
        super().__init__(
            f"target {target!r} selects nothing: {reason}; pass a submodule name from "
            "model.named_modules(), a glob over model.named_parameters() names (e.g. 'layer4.*'), "
            "a module type, or a submodule"
        )


class IncompatibleSourcesError(DoesNotFitError, ValueError):
    """Two state dicts to be averaged do not hold the same tensors (keys, shapes or dtypes differ).

    Attributes:
        key: the first key that differs.
        reference: the first source, which the others must match.
        source: the source that differs from it.
        reason: how they differ at ``key``.

    Example:
        >>> try:
        ...     torchkeep.average(["a.safetensors", "b.safetensors"], "soup.safetensors")
        ... except torchkeep.IncompatibleSourcesError as err:
        ...     print(err.key, err.source)
    """

    def __init__(self, *, key: str, reference: str, source: str, reason: str) -> None:
        self.key = key
        self.reference = reference
        self.source = source
        self.reason = reason
        super().__init__(
            f"cannot average {source} with {reference}: {key!r} {reason}; average only weights of one "
            "architecture (fine-tunes of one model, checkpoints of one run), stored in one dtype "
            "(`torchkeep convert --dtype` casts a file)."
        )


class BaseMismatchError(DoesNotFitError, ValueError):
    """A trainable-only file was saved on top of other frozen weights than the model holds.

    ``save_weights(model, path, trainable_only=True)`` records the digest of
    everything it leaves out (the frozen base); ``load_into`` compares it with
    the model's before changing anything.

    Attributes:
        path: the trainable-only file.
        expected: the base digest recorded in the file.
        found: the digest of the model's base tensors.
        differing: the base keys (as the file names them) whose tensors differ,
            or that the model holds none of.

    Example:
        >>> try:
        ...     torchkeep.load_into(model, "head.safetensors")
        ... except torchkeep.BaseMismatchError as err:
        ...     print(err.differing)
    """

    def __init__(
        self, path: str, *, expected: str, found: str, differing: Sequence[str], base_tensors: int
    ) -> None:
        self.path = path
        self.expected = expected
        self.found = found
        self.differing = list(differing)
        super().__init__(
            f"{path} was saved on top of a different base: {len(self.differing)} of the "
            f"{base_tensors} base tensors it was trained with differ in the model "
            f"({_short_list(self.differing)}; base digest {found}, the file expects {expected}), "
            "so the model was not changed; load the base weights first (e.g. "
            "torchkeep.load_into(model, 'base.safetensors'), or build the model from the same "
            "pretrained weights), or pass check_base=False to load anyway."
        )

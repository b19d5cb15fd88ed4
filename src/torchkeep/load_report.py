"""What :func:`~torchkeep.load_into` did: the :class:`LoadReport` it returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torchkeep._table import format_table
from torchkeep.errors import ShapeMismatch

__all__ = ["LoadReport"]

_REPORT_ROWS = 40


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_into` did.

    Attributes:
        loaded: model keys that received a tensor from the file.
        missing: model keys the file lacks; they keep the model's values.
        unexpected: file keys with no place in the model; ignored.
        mismatched: keys skipped because the shapes differ (``skip_mismatched=True``).
        renamed: ``file key -> model key`` for every key loaded under another name.
        cast: model keys whose tensor was converted to the model's dtype.
        source: where the state dict came from.
        tied: ``model key -> model key`` for keys the file lacks that share
            their tensor with a loaded one (tied weights): filled through it.
        adapter: the PEFT adapter loaded, when the file is an adapter; then
            ``missing`` lists the adapter's keys only.
        base_kept: with ``adapter`` or ``trainable_only``, the model's keys
            outside the adapter that the file lacks (the base model's weights,
            kept as they are).
        trainable_only: the file was written by ``save_weights(...,
            trainable_only=True)``: it holds what was fine-tuned and records
            the frozen base it was trained on.
        base_checked: with ``trainable_only``, the model's base tensors were
            compared with that record and are the same. False when
            ``check_base=False`` was passed or the model lacks base keys
            (another architecture: they are then listed in ``missing``).
    """

    loaded: tuple[str, ...]
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[ShapeMismatch, ...] = ()
    renamed: dict[str, str] = field(default_factory=dict)
    cast: tuple[str, ...] = ()
    source: str = "state dict"
    tied: dict[str, str] = field(default_factory=dict)
    adapter: str | None = None
    base_kept: tuple[str, ...] = ()
    trainable_only: bool = False
    base_checked: bool = False

    @property
    def ok(self) -> bool:
        """True when every model key was loaded and every file key was used."""
        return not (self.missing or self.unexpected or self.mismatched)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, e.g. for JSON."""
        return {
            "source": self.source,
            "loaded": list(self.loaded),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": [
                {"key": m.key, "file_shape": list(m.file_shape), "model_shape": list(m.model_shape)}
                for m in self.mismatched
            ],
            "renamed": dict(self.renamed),
            "cast": list(self.cast),
            "tied": dict(self.tied),
            "adapter": self.adapter,
            "base_kept": list(self.base_kept),
            "trainable_only": self.trainable_only,
            "base_checked": self.base_checked,
        }

    def headline(self) -> str:
        """One line: how many tensors were loaded and what was left out."""
        filled = len(self.loaded) + len(self.tied)
        total = filled + len(self.missing) + len(self.mismatched)
        if self.adapter is not None:
            parts = [f"adapter {self.adapter!r}: {filled} of {total} keys loaded from {self.source}"]
        elif self.trainable_only:
            parts = [f"loaded {filled}/{total} trainable tensors from {self.source}"]
        else:
            parts = [f"loaded {filled}/{total} tensors from {self.source}"]
        if not self.trainable_only:
            kept = "base-model tensors kept (not in an adapter file)"
        elif self.base_checked:
            kept = "base-model tensors kept, the same as the file was trained on"
        else:
            kept = "base-model tensors kept, not checked against the file's base"
        for count, what in (
            (len(self.tied), "through a tied twin"),
            (len(self.base_kept), kept),
            (len(self.renamed), "renamed"),
            (len(self.missing), "missing (kept the model's)"),
            (len(self.mismatched), "shape-mismatched (kept the model's)"),
            (len(self.unexpected), "unexpected (ignored)"),
            (len(self.cast), "cast to the model's dtype"),
        ):
            if count:
                parts.append(f"{count} {what}")
        return ", ".join(parts)

    def __str__(self) -> str:
        rows: list[tuple[str, str, str]] = []
        rows += _renamed_rows(self.renamed)
        rows += [
            ("tied", k, f"shares its tensor with {src}; filled through it") for k, src in self.tied.items()
        ]
        rows += [("missing", k, "not in the file; kept the model's value") for k in self.missing]
        rows += [
            ("mismatched", m.key, f"file {list(m.file_shape)}, model {list(m.model_shape)}; kept the model's")
            for m in self.mismatched
        ]
        rows += [("unexpected", k, "not in the model; ignored") for k in self.unexpected]
        rows += [("cast", k, "converted to the model's dtype") for k in self.cast]
        if not rows:
            return self.headline() + "; every key matched"
        shown = rows[:_REPORT_ROWS]
        text = self.headline() + "\n" + format_table(("status", "key", "detail"), shown)
        if len(rows) > _REPORT_ROWS:
            text += f"\n… {len(rows) - _REPORT_ROWS} more rows (see .to_dict())"
        return text


def _rename_rule(src: str, dst: str) -> str | None:
    if src.endswith("." + dst):
        return f"dropped prefix {src[: -len(dst)]!r}"
    if dst.endswith("." + src):
        return f"added prefix {dst[: -len(src)]!r}"
    return None


def _renamed_rows(renamed: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """Renames grouped by rule (one row for 300 keys that lost ``module.``), the rest one by one."""
    groups: dict[str, list[tuple[str, str]]] = {}
    rows = []
    for src, dst in renamed.items():
        rule = _rename_rule(src, dst)
        if rule is None:
            rows.append(("renamed", dst, f"from {src}"))
        else:
            groups.setdefault(rule, []).append((src, dst))
    for rule, pairs in groups.items():
        src, dst = pairs[0]
        label = dst if len(pairs) == 1 else f"{len(pairs)} keys"
        rows.append(("renamed", label, f"{rule} (e.g. {src} -> {dst})"))
    return rows

"""What a model or a weights file holds: parameters vs buffers, shapes, dtypes, bytes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkeep._table import format_bytes, format_table
from torchkeep.formats import FileFormat, detect_format, read_safetensors_header
from torchkeep.formats.hf import check_shard_names, find_hf_weights
from torchkeep.trainable_only import shown_metadata
from torchkeep.weights import (
    extract_state_dict,
    load_weights,
    read_metadata,
    read_torch_file,
    to_state_dict,
)

__all__ = ["Summary", "SummaryRow", "summarize"]


@dataclass(frozen=True)
class SummaryRow:
    """One named tensor.

    Attributes:
        name: its name (the state-dict key, where it has one).
        kind: ``"parameter"``, ``"buffer"``, or ``"tensor"`` when read from a
            file, which does not say.
        shape: its shape.
        dtype: its dtype without the ``torch.`` prefix, e.g. ``"float32"``.
        numel: number of elements.
        nbytes: bytes of data.
        requires_grad: whether it is trained (``None`` when read from a file).
        in_state_dict: False for non-persistent buffers.
        tied_to: the first name of the same tensor, for tied (shared) weights.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    nbytes: int
    requires_grad: bool | None = None
    in_state_dict: bool = True
    tied_to: str | None = None

    def notes(self) -> list[str]:
        """Short remarks for a table: frozen, not saved, tied to …"""
        notes = []
        if self.requires_grad is False and self.kind == "parameter":
            notes.append("frozen")
        if not self.in_state_dict:
            notes.append("not saved")
        if self.tied_to:
            notes.append(f"tied to {self.tied_to}")
        return notes


@dataclass(frozen=True)
class Summary:
    """The tensors of a model or file, printable as a table.

    Attributes:
        rows: one :class:`SummaryRow` per name, in state-dict order.
        source: what was summarized (a class name or a path).
        file_format: the file's format, for files.
        file_size: the file's size in bytes, for files.
        metadata: text metadata stored in the file.
    """

    rows: tuple[SummaryRow, ...]
    source: str
    file_format: str | None = None
    file_size: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def parameters(self) -> tuple[SummaryRow, ...]:
        """Rows of kind ``parameter``."""
        return tuple(r for r in self.rows if r.kind == "parameter")

    @property
    def buffers(self) -> tuple[SummaryRow, ...]:
        """Rows of kind ``buffer``."""
        return tuple(r for r in self.rows if r.kind == "buffer")

    @property
    def state_dict_entries(self) -> tuple[SummaryRow, ...]:
        """Rows that a state dict holds (all but non-persistent buffers)."""
        return tuple(r for r in self.rows if r.in_state_dict)

    def _unique(self, rows: tuple[SummaryRow, ...]) -> list[SummaryRow]:
        return [r for r in rows if r.tied_to is None]

    @property
    def total_numel(self) -> int:
        """Elements of all distinct tensors (tied weights counted once)."""
        return sum(r.numel for r in self._unique(self.rows))

    @property
    def total_bytes(self) -> int:
        """Bytes of all distinct tensors (tied weights counted once)."""
        return sum(r.nbytes for r in self._unique(self.rows))

    @property
    def parameter_numel(self) -> int:
        """Elements of distinct parameters: what "number of parameters" usually means."""
        return sum(r.numel for r in self._unique(self.parameters))

    @property
    def trainable_numel(self) -> int:
        """Elements of distinct parameters that require grad."""
        return sum(r.numel for r in self._unique(self.parameters) if r.requires_grad)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, e.g. for JSON."""
        return {
            "source": self.source,
            "file_format": self.file_format,
            "file_size": self.file_size,
            "metadata": dict(self.metadata),
            "totals": {
                "entries": len(self.rows),
                "parameters": len(self.parameters),
                "buffers": len(self.buffers),
                "state_dict_entries": len(self.state_dict_entries),
                "numel": self.total_numel,
                "parameter_numel": self.parameter_numel,
                "trainable_numel": self.trainable_numel,
                "bytes": self.total_bytes,
            },
            "tensors": [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "shape": list(r.shape),
                    "dtype": r.dtype,
                    "numel": r.numel,
                    "bytes": r.nbytes,
                    "requires_grad": r.requires_grad,
                    "in_state_dict": r.in_state_dict,
                    "tied_to": r.tied_to,
                }
                for r in self.rows
            ],
        }

    def totals_line(self) -> str:
        """One line of counts and sizes."""
        parts = [f"{len(self.rows)} tensors"]
        if self.parameters or self.buffers:
            parts = [
                f"{len(self.parameters)} parameters ({self.parameter_numel:,} elements, "
                f"{self.trainable_numel:,} trainable)",
                f"{len(self.buffers)} buffers",
                f"{len(self.state_dict_entries)} state-dict entries",
            ]
        else:
            parts.append(f"{self.total_numel:,} elements")
        parts.append(format_bytes(self.total_bytes))
        return ", ".join(parts)

    def __str__(self) -> str:
        rows = []
        for r in self.rows:
            notes = r.notes()
            rows.append(
                (
                    r.name,
                    r.kind,
                    list(r.shape),
                    r.dtype,
                    f"{r.numel:,}",
                    format_bytes(r.nbytes),
                    ", ".join(notes),
                )
            )
        table = format_table(("name", "kind", "shape", "dtype", "numel", "size", "note"), rows, right=(4, 5))
        head = self.source
        if self.file_format:
            head += f" ({self.file_format}, {format_bytes(self.file_size or 0)})"
        return f"{head}\n{table}\n{self.totals_line()}"


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def _rows_from_tensors(state: Mapping[str, torch.Tensor]) -> tuple[SummaryRow, ...]:
    first_name: dict[tuple[Any, ...], str] = {}
    rows = []
    for name, t in state.items():
        identity = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        tied = first_name.get(identity) if t.numel() else None
        first_name.setdefault(identity, name)
        rows.append(
            SummaryRow(
                name, "tensor", tuple(t.shape), _dtype_name(t.dtype), t.numel(), t.nbytes, tied_to=tied
            )
        )
    return tuple(rows)


def _summarize_model(model: nn.Module) -> Summary:
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    state_keys = set(model.state_dict(keep_vars=True))
    first_name: dict[int, str] = {}
    rows = []
    ordered = list(model.state_dict(keep_vars=True)) + [n for n in buffers if n not in state_keys]
    for name in ordered:
        t: torch.Tensor | None = params.get(name)
        kind = "parameter"
        if t is None:
            t, kind = buffers[name], "buffer"
        tied = first_name.get(id(t))
        first_name.setdefault(id(t), name)
        rows.append(
            SummaryRow(
                name,
                kind,
                tuple(t.shape),
                _dtype_name(t.dtype),
                t.numel(),
                t.nbytes,
                requires_grad=t.requires_grad if kind == "parameter" else None,
                in_state_dict=name in state_keys,
                tied_to=tied,
            )
        )
    return Summary(tuple(rows), type(model).__name__)


def _summarize_file(path: Path) -> Summary:
    fmt = detect_format(path)
    size = path.stat().st_size
    if fmt is FileFormat.SAFETENSORS:
        header = read_safetensors_header(path)
        rows = tuple(
            SummaryRow(t.name, "tensor", t.shape, _dtype_name(t.dtype), _numel(t.shape), t.nbytes)
            for t in header.tensors
        )
    elif fmt is FileFormat.TORCH_ZIP:
        # memory-mapped: only the pages the summary touches are read
        state = extract_state_dict(read_torch_file(path, map_location="cpu", mmap=True), path=path, key=None)
        rows = _rows_from_tensors(state)
    else:
        rows = _rows_from_tensors(load_weights(path))
    metadata = read_metadata(path) | shown_metadata(path)  # a trainable-only file's base record too
    return Summary(rows, str(path), file_format=fmt.value, file_size=size, metadata=metadata)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def summarize(obj: nn.Module | str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> Summary:
    """Describe every tensor of a model, a state dict, or a weights file.

    For a model, rows say which tensors are parameters and which are buffers
    (BatchNorm's running statistics are buffers: in the state dict, not
    trained), which are frozen, and which are tied. For a safetensors file
    only the header is read.

    Args:
        obj (nn.Module | str | PathLike | Mapping[str, Tensor]): what to describe;
            a Checkpointer checkpoint folder (or run folder: its newest valid
            checkpoint) shows the model's weights, a Hugging Face model folder or
            shard index every tensor of every shard.

    Returns:
        A :class:`Summary`; ``print(summary)`` shows the table.

    Raises:
        The errors of :func:`load_weights` for files.

    Example:
        >>> print(torchkeep.summarize(model))
    """
    if isinstance(obj, nn.Module):
        return _summarize_model(obj)
    if isinstance(obj, Mapping):
        return Summary(_rows_from_tensors(to_state_dict(obj)), "state dict")
    path = Path(obj)
    hf = find_hf_weights(path)
    if hf is not None:  # a Hugging Face folder or shard index: each file as one, checked against the index
        parts = [_summarize_file(f) for f in hf.files]
        for f, part in zip(hf.files, parts, strict=True):
            if hf.index is not None:
                check_shard_names(hf.index, f, (r.name for r in part.rows))
        rows = tuple(r for part in parts for r in part.rows)
        fmt = hf.description if hf.index is not None else parts[0].file_format
        size = sum(part.file_size or 0 for part in parts)
        meta = {**parts[0].metadata, **hf.metadata_text()}
        return Summary(rows, str(path), file_format=fmt, file_size=size, metadata=meta)
    if path.is_dir():  # a checkpoint folder, or a run folder (its newest valid checkpoint): the model
        from torchkeep.run.reader import indexed_model, model_file

        single = model_file(path)
        if single is not None:
            return _summarize_file(single)  # only the header is read
        indexed = indexed_model(path)
        if indexed is not None:  # mapped from the run's packs: only their headers are read
            folder, tensors, metadata = indexed
            size = sum(t.nbytes for t in tensors.values())
            shown = {k: v for k, v in metadata.items() if not k.startswith("torchkeep.")}
            return Summary(
                _rows_from_tensors(tensors),
                str(path),
                file_format=f"torchkeep checkpoint {folder.name} (incremental)",
                file_size=size,
                metadata=shown,
            )
        return Summary(_rows_from_tensors(load_weights(path)), str(path))
    return _summarize_file(path)

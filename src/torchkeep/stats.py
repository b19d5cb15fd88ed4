"""Numbers about the values in weights: per-tensor statistics, and how much each tensor moved.

:func:`tensor_stats` reads a file once, one tensor at a time and a chunk of
elements at a time, so its memory stays at the chunk size whatever the file's
size: safetensors data (also in Hugging Face folders and checkpoint folders)
comes in with positioned reads into one reused buffer; a ``torch.save`` zip
is memory-mapped by torchkeep's own reader (nothing unpickled). Each chunk
is converted into one reused float64 buffer (only a chunk holding NaN/Inf
needs a mask too), so the memory used is the same for any file. Means and standard deviations
are accumulated in float64 (chunk results combined with Chan's formula), so
a billion float16 values give the same answer as one float64 pass.

:func:`relative_changes` is the number behind ``torchkeep diff --plot``:
``||B - A|| / ||A||`` per tensor, in A's order.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkeep._table import format_table
from torchkeep.formats import FileFormat, detect_format, read_safetensors_header
from torchkeep.formats.base import TensorInfo
from torchkeep.formats.hf import check_shard_names, find_hf_weights
from torchkeep.weights import extract_state_dict, load_weights, read_torch_file, to_state_dict

__all__ = [
    "CHUNK_ELEMENTS",
    "STATS_HEADERS",
    "STATS_RIGHT",
    "Source",
    "StatsReport",
    "TensorChange",
    "TensorStats",
    "chunks",
    "iter_stats",
    "relative_changes",
    "stats_cells",
    "tensor_stats",
]

logger = logging.getLogger(__name__)

# Elements per chunk: 1 Mi elements is 8 MiB as float64, the one working copy made of a chunk.
CHUNK_ELEMENTS = 1 << 20

Number = int | float
Source = nn.Module | str | os.PathLike[str] | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class TensorStats:
    """The values of one tensor, summed up.

    ``min``, ``max``, ``mean`` and ``std`` are over the finite values only;
    NaN and ±Inf are counted instead. ``std`` is the sample standard
    deviation (correction 1, as ``torch.std``).

    Attributes:
        name: the tensor's name.
        dtype: its dtype without ``torch.``, e.g. ``"float32"``.
        shape: its shape.
        numel: its number of elements.
        min: the smallest finite value (an ``int`` for integer and bool
            tensors), ``None`` when there is none.
        max: the largest finite value, likewise.
        mean: the mean of the finite values (float64), ``None`` when there is none.
        std: their standard deviation, ``None`` with fewer than two.
        nan: how many elements are NaN.
        inf: how many are +Inf or -Inf.
        tied_to: the first name of the same tensor, for tied weights (its
            numbers are that tensor's, read once).
        note: why some numbers are missing (complex values, a packed dtype).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    min: Number | None
    max: Number | None
    mean: float | None
    std: float | None
    nan: int = 0
    inf: int = 0
    tied_to: str | None = None
    note: str = ""

    @property
    def finite(self) -> bool:
        """Whether no element is NaN or Inf."""
        return self.nan == 0 and self.inf == 0

    def to_dict(self) -> dict[str, Any]:
        """Plain data, e.g. for JSON (no NaN: missing numbers are ``None``)."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "numel": self.numel,
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "std": self.std,
            "nan": self.nan,
            "inf": self.inf,
            "tied_to": self.tied_to,
            "note": self.note,
        }


@dataclass(frozen=True)
class StatsReport:
    """The result of :func:`tensor_stats`: one :class:`TensorStats` per tensor, in file order.

    Attributes:
        rows: the tensors.
        source: what was read.
        file_format: the format read, e.g. ``"safetensors"``.
    """

    rows: tuple[TensorStats, ...]
    source: str
    file_format: str | None = None

    @property
    def nonfinite(self) -> tuple[TensorStats, ...]:
        """The tensors holding NaN or Inf."""
        return tuple(r for r in self.rows if not r.finite)

    @property
    def numel(self) -> int:
        """Elements of all distinct tensors (tied ones counted once)."""
        return sum(r.numel for r in self.rows if r.tied_to is None)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, e.g. for JSON."""
        return {
            "source": self.source,
            "file_format": self.file_format,
            "totals": {
                "tensors": len(self.rows),
                "numel": self.numel,
                "nonfinite_tensors": len(self.nonfinite),
                "nan": sum(r.nan for r in self.rows if r.tied_to is None),
                "inf": sum(r.inf for r in self.rows if r.tied_to is None),
            },
            "tensors": [r.to_dict() for r in self.rows],
        }

    def totals_line(self) -> str:
        """One line: counts, and which tensors hold NaN/Inf."""
        line = f"{len(self.rows)} tensors, {self.numel:,} elements"
        bad = self.nonfinite
        if not bad:
            return line + "; no NaN or Inf"
        names = ", ".join(r.name for r in bad[:5]) + (" …" if len(bad) > 5 else "")
        return line + f"; {len(bad)} hold NaN/Inf: {names}"

    def __str__(self) -> str:
        table = format_table(STATS_HEADERS, [stats_cells(r) for r in self.rows], right=STATS_RIGHT)
        head = self.source + (f" ({self.file_format})" if self.file_format else "")
        return f"{head}\n{table}\n{self.totals_line()}"


STATS_HEADERS = ("name", "dtype", "shape", "min", "max", "mean", "std", "nan", "inf", "note")
STATS_RIGHT = (3, 4, 5, 6, 7, 8)


def _number(value: Number | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def stats_cells(row: TensorStats) -> list[str]:
    """The cells of one row of a stats table (:data:`STATS_HEADERS`)."""
    return [
        row.name,
        row.dtype,
        str(list(row.shape)),
        _number(row.min),
        _number(row.max),
        _number(row.mean),
        _number(row.std),
        str(row.nan),
        str(row.inf),
        f"tied to {row.tied_to}" if row.tied_to else row.note,
    ]


# integer dtypes whose min/max torch computes natively (exactly); the others go through float64
_NATIVE_MINMAX = (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class _Moments:
    """Running count / mean / sum of squared deviations, min, max, NaN and Inf counts.

    ``scratch`` is a float64 buffer at least as long as the longest chunk: each chunk is
    converted into it, so reading a file allocates no new memory per chunk.
    """

    def __init__(self, scratch: torch.Tensor) -> None:
        self.scratch = scratch
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.low: Number | None = None
        self.high: Number | None = None
        self.nan = 0
        self.inf = 0

    def add(self, chunk: torch.Tensor) -> None:
        if chunk.numel() == 0:
            return
        if chunk.dtype.is_complex:  # no order, no single mean: only count the bad values
            self.nan += int(torch.isnan(chunk).sum())
            self.inf += int(torch.isinf(chunk).sum())
            return
        values = self.scratch[: chunk.numel()].view(chunk.shape)
        values.copy_(chunk)
        low: Number
        high: Number
        if chunk.is_floating_point():
            low_t, high_t = torch.aminmax(values)  # NaN propagates: finite ends mean all finite
            if not (math.isfinite(float(low_t)) and math.isfinite(float(high_t))):
                finite = torch.isfinite(values)
                bad = values.numel() - int(torch.count_nonzero(finite))
                nan = int(torch.count_nonzero(torch.isnan(values)))
                self.nan += nan
                self.inf += bad - nan
                values = values[finite]
                if not values.numel():
                    return
                low_t, high_t = torch.aminmax(values)
            low, high = float(low_t), float(high_t)
        elif chunk.dtype in _NATIVE_MINMAX:  # exact, also for int64 beyond 2**53
            low_t, high_t = torch.aminmax(chunk)
            low, high = int(low_t), int(high_t)
        else:  # uint16 / uint32: exact in float64; uint64 above 2**53 only approximately
            low_t, high_t = torch.aminmax(values)
            low, high = int(low_t), int(high_t)
        self.low = low if self.low is None else min(self.low, low)
        self.high = high if self.high is None else max(self.high, high)
        n = values.numel()
        var_t, mean_t = torch.var_mean(values, correction=0)
        mean, m2 = float(mean_t), float(var_t) * n
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def result(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], note: str = "") -> TensorStats:
        if dtype.is_complex and not note:
            note = "complex: only NaN/Inf counted"
        return TensorStats(
            name=name,
            dtype=_dtype_name(dtype),
            shape=shape,
            numel=math.prod(shape),
            min=self.low,
            max=self.high,
            mean=self.mean if self.count else None,
            std=math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else None,
            nan=self.nan,
            inf=self.inf,
            note=note,
        )


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def chunks(t: torch.Tensor, limit: int = CHUNK_ELEMENTS) -> Iterator[torch.Tensor]:
    """Views of ``t`` of at most ``limit`` elements each, covering every element once (any strides)."""
    if t.dim() == 0 or t.numel() <= limit:
        yield t
        return
    row = t[0].numel()
    if row > limit:
        for i in range(t.shape[0]):
            yield from chunks(t[i], limit)
        return
    rows = max(1, limit // max(row, 1))
    for i in range(0, t.shape[0], rows):
        yield t[i : i + rows]


def _scratch(numels: Iterable[int], limit: int) -> torch.Tensor:
    """The float64 buffer chunks are converted into: as long as the longest chunk needed."""
    return torch.empty(max((min(limit, n) for n in numels), default=0), dtype=torch.float64)


def _stats_of(name: str, t: torch.Tensor, limit: int, scratch: torch.Tensor) -> TensorStats:
    moments = _Moments(scratch)
    for chunk in chunks(t.detach(), limit):
        moments.add(chunk.cpu())
    return moments.result(name, t.dtype, tuple(t.shape))


def _tensor_stats_from_memory(state: Mapping[str, torch.Tensor], limit: int) -> Iterator[TensorStats]:
    """Stats of tensors already at hand (or mapped), tied ones computed once."""
    scratch = _scratch((t.numel() for t in state.values()), limit)
    seen: dict[tuple[Any, ...], TensorStats] = {}
    for name, t in state.items():
        identity = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        first = seen.get(identity) if t.numel() else None
        if first is not None:
            yield dataclasses.replace(first, name=name, tied_to=first.name)
            continue
        row = _stats_of(name, t, limit, scratch)
        seen[identity] = row
        yield row


def _safetensors_stats(path: Path, limit: int) -> Iterator[TensorStats]:
    """Stats of a safetensors file's tensors, read with positioned reads into one reused buffer."""
    header = read_safetensors_header(path)  # checked: ranges tile the data, sizes match the shapes
    # one buffer for every chunk: as large as the largest chunk of the largest item size
    largest = max((min(limit, math.prod(i.shape)) * (_itemsize(i) or 1) for i in header.tensors), default=1)
    buffer = bytearray(max(largest, 1))
    view = memoryview(buffer)
    scratch = _scratch((math.prod(i.shape) for i in header.tensors), limit)
    fd = os.open(path, os.O_RDONLY)
    try:
        for info in header.tensors:
            yield _safetensors_tensor(fd, path, header.data_start, info, view, limit, scratch)
    finally:
        os.close(fd)


def _itemsize(info: TensorInfo) -> int | None:
    dtype = getattr(torch, info.dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or math.prod(info.shape) * dtype.itemsize != info.nbytes:
        return None  # a dtype this torch lacks, or a packed sub-byte one (float4)
    return dtype.itemsize


def _safetensors_tensor(
    fd: int, path: Path, base: int, info: TensorInfo, view: memoryview, limit: int, scratch: torch.Tensor
) -> TensorStats:
    dtype = getattr(torch, info.dtype.removeprefix("torch."), None)
    size = _itemsize(info)
    numel = math.prod(info.shape)
    if not isinstance(dtype, torch.dtype) or size is None:
        note = f"{_dtype_name(info.dtype)} is packed or unknown to this torch: values not read"
        return TensorStats(info.name, _dtype_name(info.dtype), info.shape, numel, *(None,) * 4, note=note)
    moments = _Moments(scratch)
    done = 0
    while done < numel:
        count = min(limit, numel - done)
        nbytes = count * size
        offset = base + info.offset + done * size
        got = 0
        while got < nbytes:  # a positioned read may return less than asked
            n = os.preadv(fd, [view[got:nbytes]], offset + got)
            if n == 0:
                from torchkeep.errors import CorruptFileError

                raise CorruptFileError(path, f"the file ended inside tensor {info.name!r}")
            got += n
        moments.add(torch.frombuffer(view[:nbytes], dtype=dtype, count=count))
        done += count
    return moments.result(info.name, dtype, info.shape)


def _zip_stats(path: Path, limit: int) -> Iterator[TensorStats]:
    # mapped, not read: each tensor's pages come in as its chunks are converted
    state = extract_state_dict(read_torch_file(path, map_location="cpu", mmap=True), path=path, key=None)
    yield from _tensor_stats_from_memory(state, limit)


def _file_stats(path: Path, limit: int) -> tuple[str, Iterator[TensorStats]]:
    fmt = detect_format(path)
    if fmt is FileFormat.SAFETENSORS:
        return fmt.value, _safetensors_stats(path, limit)
    if fmt is FileFormat.TORCH_ZIP:
        return fmt.value, _zip_stats(path, limit)
    # the legacy format and .pt2 programs have no lazy reader: read whole, safely
    return fmt.value, _tensor_stats_from_memory(load_weights(path), limit)


def _checked_shard(index: Any, file: Path, rows: Iterator[TensorStats]) -> Iterator[TensorStats]:
    got = list(rows)
    check_shard_names(index, file, (r.name for r in got))
    yield from got


def _sources(path: Path, limit: int) -> tuple[str, Iterator[TensorStats]]:
    from torchkeep.run.reader import indexed_model, model_file

    single = model_file(path) if path.is_dir() else None
    if single is not None:  # a checkpoint folder, or a run folder (its newest valid checkpoint): the model
        return f"torchkeep checkpoint {single.parent.name}", _safetensors_stats(single, limit)
    indexed = indexed_model(path) if path.is_dir() else None
    if indexed is not None:  # an incremental checkpoint: mapped from the run's packs, read as asked
        folder, tensors, _ = indexed
        return f"torchkeep checkpoint {folder.name}", _tensor_stats_from_memory(tensors, limit)
    hf = find_hf_weights(path)
    if hf is not None:  # each shard as a single file, its names checked against the index

        def shards() -> Iterator[TensorStats]:
            for file in hf.files:
                _, rows = _file_stats(file, limit)
                yield from (_checked_shard(hf.index, file, rows) if hf.index is not None else rows)

        fmt = hf.description if hf.index is not None else detect_format(hf.files[0]).value
        return fmt, shards()
    if path.is_dir():  # a sharded or version-1 checkpoint: read whole, as load_weights does
        return "torchkeep checkpoint", _tensor_stats_from_memory(load_weights(path), limit)
    return _file_stats(path, limit)


def iter_stats(source: Source, *, chunk: int = CHUNK_ELEMENTS) -> tuple[str, Iterator[TensorStats]]:
    """The format of ``source`` and a lazy iterator of its tensors' :class:`TensorStats`.

    The iterator reads a tensor when it is asked for the next one, so a caller
    can show progress; :func:`tensor_stats` collects it.

    Args:
        source (nn.Module | str | PathLike | Mapping[str, Tensor]): what
            :func:`tensor_stats` takes.
        chunk (int, default CHUNK_ELEMENTS): elements read and converted at once.

    Returns:
        ``(format, rows)``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 element, got {chunk}")
    if isinstance(source, nn.Module | Mapping):
        return "state dict", _tensor_stats_from_memory(to_state_dict(source), chunk)
    return _sources(Path(source), chunk)


def tensor_stats(source: Source, *, chunk: int = CHUNK_ELEMENTS) -> StatsReport:
    """Min, max, mean, std and NaN / Inf counts of every tensor, read once with bounded memory.

    Args:
        source (nn.Module | str | PathLike | Mapping[str, Tensor]): a model, a
            state dict, or a file: safetensors, ``torch.save`` (zip: memory-mapped
            by the safe reader; legacy: read whole, safely), a Hugging Face model
            folder or shard index, a Checkpointer checkpoint folder (or a run
            folder: its newest valid checkpoint).
        chunk (int, default CHUNK_ELEMENTS): elements read and converted to
            float64 at once; memory stays near ``chunk * 8`` bytes plus one
            buffer of ``chunk`` items of the widest dtype.

    Returns:
        A :class:`StatsReport`; ``print()`` shows the table, ``.nonfinite``
        the tensors holding NaN/Inf.

    Raises:
        The errors of :func:`torchkeep.load_weights` for files that cannot be read.

    Example:
        >>> report = torchkeep.stats.tensor_stats("model.safetensors")
        >>> [r.name for r in report.nonfinite]
        []
    """
    fmt, rows = iter_stats(source, chunk=chunk)
    shown = type(source).__name__ if isinstance(source, nn.Module) else str(source)
    if isinstance(source, Mapping):
        shown = "state dict"
    return StatsReport(tuple(rows), shown, fmt)


@dataclass(frozen=True)
class TensorChange:
    """How far one tensor moved from A to B, as :func:`relative_changes` measures it.

    Attributes:
        key: the tensor's name.
        status: ``"changed"``, ``"unchanged"`` (equal values), ``"from_zero"``
            (A is all zeros, B is not), ``"nonfinite"`` (NaN/Inf on a side),
            ``"shape"`` (the shapes differ: a replaced head), ``"only_a"``,
            ``"only_b"``, or ``"not_float"`` (integer and bool tensors, e.g.
            ``num_batches_tracked``: compared, not measured).
        relative: ``||B - A|| / ||A||`` (0.0 when unchanged; ``None`` where it
            has no value: see ``status``).
        norm_a: ``||A||`` (the L2 norm over all elements, float64), where measured.
        norm_diff: ``||B - A||``, where measured.
    """

    key: str
    status: str
    relative: float | None = None
    norm_a: float | None = None
    norm_diff: float | None = None


def _norms(a: torch.Tensor, b: torch.Tensor, limit: int) -> tuple[float, float]:
    """``(||A||, ||B - A||)`` in float64 (complex128), a chunk at a time."""
    wide = torch.complex128 if (a.dtype.is_complex or b.dtype.is_complex) else torch.float64
    sum_a = sum_d = 0.0
    for ca, cb in zip(chunks(a, limit), chunks(b, limit), strict=True):
        xa = ca.to(wide)
        sum_a += float(torch.linalg.vector_norm(xa) ** 2)
        sum_d += float(torch.linalg.vector_norm(cb.to(wide) - xa) ** 2)
    return math.sqrt(sum_a), math.sqrt(sum_d)


def _measured(key: str, a: torch.Tensor, b: torch.Tensor, limit: int) -> TensorChange:
    norm_a, norm_diff = _norms(a, b, limit)
    if not (math.isfinite(norm_a) and math.isfinite(norm_diff)):
        return TensorChange(key, "nonfinite", None, norm_a, norm_diff)
    if norm_diff == 0.0:  # the same values in another dtype (or -0.0 for 0.0)
        return TensorChange(key, "unchanged", 0.0, norm_a, norm_diff)
    if norm_a == 0.0:
        return TensorChange(key, "from_zero", None, norm_a, norm_diff)
    return TensorChange(key, "changed", norm_diff / norm_a, norm_a, norm_diff)


def relative_changes(
    a: Source, b: Source, *, chunk: int = CHUNK_ELEMENTS, progress: Callable[[str], None] | None = None
) -> list[TensorChange]:
    """How much each tensor moved from ``a`` to ``b``: ``||B - A|| / ||A||``, in A's order.

    Tensors only in B follow, in B's order. Which tensors differ at all is
    decided by :func:`torchkeep.diff` (tied names are compared through their
    twin and not listed twice); norms are float64, over chunks.

    Args:
        a, b (nn.Module | str | PathLike | Mapping[str, Tensor]): before and
            after: models, state dicts, or any files :func:`torchkeep.load_weights` reads.
        chunk (int, default CHUNK_ELEMENTS): elements converted to float64 at once.
        progress (Callable[[str], None] | None, default None): called with each key measured.

    Returns:
        One :class:`TensorChange` per tensor.

    Example:
        >>> moved = relative_changes("pretrained.safetensors", "finetuned.safetensors")
        >>> [c.key for c in moved if c.status == "unchanged"]  # the frozen ones
    """
    from torchkeep.diff import diff

    sa = to_state_dict(a) if isinstance(a, nn.Module | Mapping) else load_weights(a)
    sb = to_state_dict(b) if isinstance(b, nn.Module | Mapping) else load_weights(b)
    result = diff(sa, sb)
    changed = {c.key for c in result.changed}
    out: list[TensorChange] = []
    for key, ta in sa.items():
        if key in result.tied:
            continue  # the same tensor as a twin listed under its own name
        if key not in sb:
            out.append(TensorChange(key, "only_a"))
            continue
        tb = sb[key]
        if progress is not None:
            progress(key)
        if ta.shape != tb.shape:
            out.append(TensorChange(key, "shape"))
        elif not (ta.is_floating_point() or ta.is_complex()) or not (
            tb.is_floating_point() or tb.is_complex()
        ):
            out.append(TensorChange(key, "not_float", 0.0 if key not in changed else None))
        elif key not in changed:
            out.append(TensorChange(key, "unchanged", 0.0))
        else:
            out.append(_measured(key, ta.detach().cpu(), tb.detach().cpu(), chunk))
    out.extend(TensorChange(key, "only_b") for key in result.only_b)
    return out

"""Averaging the weights of several files: model soups, SWA over a run's checkpoints.

:func:`average` reads one source at a time (any file or folder
:func:`torchkeep.load_weights` reads: weights, checkpoints, step and run
folders) and adds it into one accumulator per floating-point tensor, so at
most one source is held next to the accumulators. Every source must hold
the keys, shapes and dtypes of the first.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from torchkeep.errors import IncompatibleSourcesError, InvalidArgumentError, ModelFileNotFoundError
from torchkeep.formats import suffix_format
from torchkeep.storage.remote import is_url, resolve
from torchkeep.weights import MapLocation, _view_identity, load_weights, save_weights, to_state_dict

__all__ = ["Source", "average", "check_out", "normalized_weights"]

logger = logging.getLogger(__name__)

Source = str | os.PathLike[str] | Mapping[str, torch.Tensor] | nn.Module
StateDict = dict[str, torch.Tensor]


def normalized_weights(
    weights: Sequence[float] | None, count: int, *, option: str | None = None
) -> list[float]:
    """``weights`` scaled to sum to 1 (uniform when None), checked to be usable.

    Args:
        weights (Sequence[float] | None): one weight per source (any real
            numbers, numpy's included, or a 1-D array or tensor), or None for
            uniform weights.
        count (int): the number of sources.
        option (str | None, default None): the command-line option the
            weights came from (``"--weights"``): errors then show its syntax.

    Raises:
        InvalidArgumentError: not one weight per source, a negative or
            non-finite weight, or weights that sum to zero.

    Example:
        >>> normalized_weights([2, 1, 1], 3)
        [0.5, 0.25, 0.25]
    """
    example = [1] * (count - 1) + [2] if count > 1 else [1]
    if option is None:
        argument = "weights"
        fix = f"pass {count} non-negative numbers, one per source, not all zero (e.g. weights={example})"
    else:
        argument = option
        fix = (
            f"pass {option} with {count} comma-separated non-negative numbers, one per source, "
            f"not all zero (e.g. {option} {','.join(map(str, example))})"
        )
    if weights is None:
        return [1.0 / count] * count
    if getattr(weights, "ndim", None) == 1 and callable(getattr(weights, "tolist", None)):
        values = list(weights.tolist())  # type: ignore[attr-defined]  # a 1-D numpy array or tensor
    elif isinstance(weights, str | bytes) or not isinstance(weights, Sequence):
        raise InvalidArgumentError(argument, weights, "is not a list of numbers", fix)
    else:
        values = list(weights)
    shown: object = weights if option is None else ",".join(f"{w:g}" for w in values)
    if len(values) != count:
        raise InvalidArgumentError(argument, shown, f"holds {len(values)} weights for {count} sources", fix)
    for w in values:
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise InvalidArgumentError(argument, shown, f"holds {w!r}, which is not a number", fix)
        if not math.isfinite(w) or w < 0:
            raise InvalidArgumentError(
                argument, shown, f"holds {float(w)!r}, which is not a finite number >= 0", fix
            )
    floats = [float(w) for w in values]
    total = math.fsum(floats)
    if total <= 0:
        raise InvalidArgumentError(argument, shown, "sums to zero", fix)
    return [w / total for w in floats]


def _local(source: object) -> Path | None:
    """The local path a source names (None for a URL, a state dict or a model)."""
    if isinstance(source, str | os.PathLike) and not is_url(source):
        local = resolve(source)
        return local if isinstance(local, Path) else None
    return None


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_out(out: str | os.PathLike[str], sources: Sequence[Source]) -> None:
    """Refuse an ``out`` that is one of the sources (the same file, by any name) or inside one.

    Reads nothing and writes nothing: paths are compared resolved (symlinks,
    ``..``) and, where both exist, as files (hard links).

    Raises:
        InvalidArgumentError: ``out`` is a source, or lies inside a source folder.

    Example:
        >>> check_out("soup.safetensors", ["a.safetensors", "b.safetensors"])
    """
    fix = "write the average to a new file (e.g. soup.safetensors next to the sources); no source is replaced"
    target = _local(out)
    for index, source in enumerate(sources):
        if target is None:
            if is_url(out) and isinstance(source, str) and source.rstrip("/") == os.fspath(out).rstrip("/"):
                raise InvalidArgumentError("out", os.fspath(out), f"is sources[{index}]", fix)
            continue
        local = _local(source)
        if local is None:
            continue
        if _same_file(target, local):
            raise InvalidArgumentError(
                "out", os.fspath(out), f"is sources[{index}] ({_name(source, index)})", fix
            )
        if local.is_dir() and target.resolve().is_relative_to(local.resolve()):
            raise InvalidArgumentError(
                "out", os.fspath(out), f"is inside sources[{index}], the folder {_name(source, index)}", fix
            )


def _name(source: Source, index: int) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    return f"sources[{index}] (a {type(source).__name__})"


def _read(source: Source, device: MapLocation) -> StateDict:
    if isinstance(source, str | os.PathLike):
        return load_weights(source, map_location=device)
    return {k: v.to(device) for k, v in to_state_dict(source).items()}


Spec = tuple[torch.Size, torch.dtype]


def _check_like(reference: Mapping[str, Spec], state: StateDict, ref_name: str, name: str) -> None:
    """Refuse ``state`` unless it has exactly ``reference``'s keys, shapes and dtypes."""

    def refuse(key: str, reason: str) -> IncompatibleSourcesError:
        return IncompatibleSourcesError(key=key, reference=ref_name, source=name, reason=reason)

    for key, (shape, dtype) in reference.items():
        if key not in state:
            raise refuse(key, f"is in {ref_name} but not in {name}")
        t = state[key]
        if t.shape != shape:
            raise refuse(key, f"has the shape {list(shape)} in {ref_name} but {list(t.shape)} in {name}")
        if t.dtype != dtype:
            raise refuse(key, f"is {dtype} in {ref_name} but {t.dtype} in {name}")
    for key in state:
        if key not in reference:
            raise refuse(key, f"is in {name} but not in {ref_name}")


def _ties(state: StateDict) -> dict[str, str]:
    """``alias -> canonical`` for keys that are the same tensor (tied weights) in ``state``."""
    seen: dict[tuple[object, ...], str] = {}
    ties: dict[str, str] = {}
    for key, t in state.items():
        if t.numel() == 0:
            continue
        identity = _view_identity(t)
        if identity in seen:
            ties[key] = seen[identity]
        else:
            seen[identity] = key
    return ties


def _check_ties(ties: Mapping[str, str], state: StateDict, ref_name: str, name: str) -> None:
    """Refuse ``state`` if keys tied in the first source hold different values in it."""
    for alias, canonical in ties.items():
        a, b = state[alias], state[canonical]
        if a is not b and not torch.equal(a, b):
            raise IncompatibleSourcesError(
                key=alias,
                reference=ref_name,
                source=name,
                reason=f"is tied to {canonical!r} in {ref_name} (one tensor) but differs from it in {name}",
            )


def _accumulator(value: torch.Tensor, accumulate: torch.dtype) -> torch.Tensor:
    if value.is_complex():
        dtype = torch.promote_types(value.dtype, accumulate)
    else:
        dtype = value.dtype if value.dtype.itemsize > accumulate.itemsize else accumulate
    return torch.zeros(value.shape, dtype=dtype, device=value.device)


def _add(
    state: StateDict,
    share: float,
    *,
    skip: Mapping[str, str],
    sums: dict[str, torch.Tensor],
    kept: StateDict | None,
    dtype: torch.dtype,
) -> None:
    """Add ``share * state`` into ``sums``; copy the tensors not averaged into ``kept`` (if given)."""
    with torch.no_grad():
        for key, value in state.items():
            if key in skip:
                continue
            if not (value.is_floating_point() or value.is_complex()):
                if kept is not None:
                    kept[key] = value.clone()
                continue
            if key not in sums:
                sums[key] = _accumulator(value, dtype)
            if share > 0:  # so that a weight-0 source holding inf or NaN leaves no trace
                # add_ casts in its kernel, except from float8, which torch does not promote
                sums[key].add_(value if value.dtype.itemsize > 1 else value.to(sums[key].dtype), alpha=share)


def average(
    sources: Sequence[Source],
    out: str | os.PathLike[str] | None = None,
    *,
    weights: Sequence[float] | None = None,
    accumulate_dtype: torch.dtype = torch.float64,
    device: MapLocation = "cpu",
    durable: bool = True,
) -> StateDict:
    """Average the weights of several files (a model soup, or SWA over a run's checkpoints).

    Floating-point (and complex) tensors are averaged, uniformly or with
    ``weights``, which are normalised to sum to 1 (``[2, 1, 1]`` is
    ``[0.5, 0.25, 0.25]``). Integer and bool tensors (BatchNorm's
    ``num_batches_tracked``) cannot be averaged: they are taken from the
    source with the largest weight (the first of those on a tie), so with
    weights ``[0, 1, 0]`` the result is exactly the second source. BatchNorm
    running means and variances are averaged as ordinary floats; the
    statistics of the averaged weights differ from that, so recompute them
    with ``torch.optim.swa_utils.update_bn(loader, model)`` after loading the
    result when the model has BatchNorm layers.

    Sources are read one at a time into ``accumulate_dtype`` accumulators (one
    per floating-point tensor), so memory holds the accumulators and one
    source, whatever the number of sources; a source with weight 0 is read
    and checked but not added. The result has the sources' dtypes.

    Args:
        sources (Sequence[str | PathLike | Mapping | nn.Module]): what to
            average: weights files, checkpoint files, step folders or run
            folders (their newest valid checkpoint), Hugging Face folders,
            URLs (anything :func:`torchkeep.load_weights` reads, read as
            safely), or state dicts and models in memory.
        out (str | PathLike | None, default None): also write the result
            there, in the format of its suffix as :func:`save_weights` does
            (the sources and weights are recorded in its metadata). Like
            :func:`save_weights`, an existing file there is replaced
            (atomically, after every source was read); ``out`` may not be one
            of the sources, nor lie inside a source folder. The
            ``torchkeep average`` command refuses an existing OUT unless
            ``--force``.
        weights (Sequence[float] | None, default None): one non-negative
            weight per source (any real numbers, numpy's too, or a 1-D array
            or tensor), not all zero; None averages uniformly.
        accumulate_dtype (torch.dtype, default torch.float64): the
            accumulators' floating-point dtype. float64 gives back identical
            sources bit for bit; ``torch.float32`` halves the memory for a big
            model (results then differ from float64 by about 1e-7, relatively).
        device (str | torch.device, default "cpu"): where sources are read to
            and summed (``"cuda"`` to add on a GPU).
        durable (bool, default True): fsync ``out`` before it replaces the path.

    Returns:
        The averaged state dict (``dict[str, Tensor]``, on ``device``), keys in
        the first source's order.

    Raises:
        InvalidArgumentError: fewer than two sources, a lone path instead of
            a list, unusable ``weights`` / ``accumulate_dtype``, or an ``out``
            that is one of the sources.
        IncompatibleSourcesError: a source's keys, shapes or dtypes differ
            from the first's (the error names the first such key and both sources).
        UnsupportedSuffixError: ``out``'s suffix names no weights format.
        ModelFileNotFoundError: a local source does not exist (every one is
            checked before the first is read).
        CorruptFileError, UnsafeFileError, NotAStateDictError: a source cannot
            be read as weights, as :func:`load_weights` says.

    Example:
        >>> torchkeep.average(["ft-lr1e-5.safetensors", "ft-lr3e-5.safetensors"], "soup.safetensors")
        >>> swa = torchkeep.average(sorted(Path("runs/exp1").glob("step-*")), weights=[1, 1, 2])
    """
    if isinstance(sources, str | bytes | os.PathLike) or not isinstance(sources, Sequence):
        raise InvalidArgumentError(
            "sources", sources, "is not a list of sources", "pass a list, e.g. average(['a.pt', 'b.pt'], out)"
        )
    if len(sources) < 2:
        raise InvalidArgumentError(
            "sources",
            list(sources),
            "is empty" if not sources else "holds one source, and an average needs at least two",
            "pass two or more sources (the same file twice gives it back unchanged); to copy or convert "
            "one file, use torchkeep.save_weights(torchkeep.load_weights(src), out) or `torchkeep convert`",
        )
    if not (isinstance(accumulate_dtype, torch.dtype) and accumulate_dtype.is_floating_point):
        raise InvalidArgumentError(
            "accumulate_dtype",
            accumulate_dtype,
            "is not a floating-point dtype",
            "pass torch.float64 (the default) or torch.float32",
        )
    shares = normalized_weights(weights, len(sources))
    if out is not None:
        suffix_format(Path(os.fspath(out)))  # a wrong suffix is refused before any reading
        check_out(out, sources)
    for source in sources:  # a typo in the last path is found before the first is read
        local = _local(source)
        if local is not None and not local.exists():
            raise ModelFileNotFoundError(local)
    heaviest = max(range(len(sources)), key=lambda i: (shares[i], -i))
    names = [_name(s, i) for i, s in enumerate(sources)]
    reference: dict[str, Spec] = {}
    ties: dict[str, str] = {}
    sums: dict[str, torch.Tensor] = {}
    kept: StateDict = {}  # the tensors not averaged, from the heaviest source
    for index, source in enumerate(sources):
        state = _read(source, device)
        if index == 0:
            reference = {k: (v.shape, v.dtype) for k, v in state.items()}
            ties = _ties(state)
        else:
            _check_like(reference, state, names[0], names[index])
            _check_ties(ties, state, names[0], names[index])
        _add(
            state,
            shares[index],
            skip=ties,
            sums=sums,
            kept=kept if index == heaviest else None,
            dtype=accumulate_dtype,
        )
        logger.info("added %s (weight %.4g), %d of %d", names[index], shares[index], index + 1, len(sources))
        del state  # before the next source is read: one source in memory at a time
    result: StateDict = {}
    for key, (_, dtype) in reference.items():
        if key in ties:
            result[key] = result[ties[key]]
        else:
            result[key] = kept[key] if key in kept else sums.pop(key).to(dtype)
    if out is not None:
        metadata = {"averaged_from": json.dumps(names), "average_weights": json.dumps(shares)}
        save_weights(result, out, metadata=metadata, durable=durable)
    return result

"""What a checkpoint holds, under torchkeep's names, whatever library wrote it; and reading its files."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchkeep.errors import CorruptFileError, LimitExceededError, UnsafeFileError
from torchkeep.formats import FileFormat, detect_format
from torchkeep.safety import Limits, scan
from torchkeep.safety.opaque import Opaque, find_opaque, rebuild
from torchkeep.safety.torchfile import load_torch_file
from torchkeep.weights import MapLocation, load_weights, read_torch_file

__all__ = ["HYPER_PARAMETER_KEYS", "Reading", "Saved", "allow_placeholders", "read_file"]

logger = logging.getLogger(__name__)

#: Top-level checkpoint entries that hold configuration rather than state: the
#: only places an inert :class:`~torchkeep.safety.opaque.Opaque` placeholder may be.
HYPER_PARAMETER_KEYS = frozenset(
    {
        "hyper_parameters",
        "hparams",
        "hparams_name",
        "hparams_type",
        "datamodule_hyper_parameters",
        "datamodule_hparams_name",
        "datamodule_hparams_type",
        "args",
        "arch",
        "config",
        "cfg",
        "training_args",
        "callbacks",
    }
)


@dataclass(frozen=True)
class Reading:
    """How to read a checkpoint's files: passed down from ``load_checkpoint``."""

    map_location: MapLocation
    trust: bool
    limits: Limits
    placeholders: bool
    rebuild: Collection[str]


@dataclass
class Saved:
    """The parts of a checkpoint, found by its layout's reader.

    ``optimizers`` and ``schedulers`` list every saved state (Lightning and
    accelerate save one per optimizer). ``rng`` is in torchkeep's own RNG
    format (:func:`torchkeep.rng.capture_rng_state`). ``absent`` says, per
    part, why an entry that looks like it could not be used.
    """

    layout: str
    model: Any = None
    optimizers: list[Any] = field(default_factory=list)
    schedulers: list[Any] = field(default_factory=list)
    scaler: Any = None
    rng: dict[str, Any] | None = None
    epoch: int | float | None = None
    step: int | None = None
    loss: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    loops: dict[str, Any] = field(default_factory=dict)
    best_metric: float | None = None
    best_checkpoint: str | None = None
    log_history: list[Any] = field(default_factory=list)
    placeholders: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)
    absent: dict[str, str] = field(default_factory=dict)

    def skip(self, note: str) -> None:
        """Record (and log) something the checkpoint holds that was not read."""
        logger.info("%s", note)
        self.skipped.append(note)


def read_file(path: Path, reading: Reading) -> Any:
    """The content of one checkpoint file: safetensors, or a ``torch.save`` file read safely.

    With ``reading.placeholders`` objects outside the allowlist come back as
    inert :class:`Opaque` placeholders; the caller must then call
    :func:`allow_placeholders` on the result, which refuses them anywhere
    but where they may be.

    Raises:
        UnsafeFileError, LimitExceededError, CorruptFileError: as for :func:`torchkeep.load_weights`.
    """
    if detect_format(path, limits=reading.limits) in {FileFormat.SAFETENSORS, FileFormat.TORCH_EXPORT}:
        return load_weights(path, map_location=reading.map_location, limits=reading.limits)
    if reading.trust or not reading.placeholders:
        return read_torch_file(
            path, map_location=reading.map_location, trust=reading.trust, limits=reading.limits
        )
    try:
        return load_torch_file(path, map_location=reading.map_location, limits=reading.limits, opaque=True)
    except (CorruptFileError, LimitExceededError):
        # Going on past a name the allowlist lacks can reach damage (or a bound) that the strict
        # reader never gets to: its verdict (UnsafeFileError at the first such name) is the one
        # every other entry point and scan give, so it is the one to give here.
        read_torch_file(path, map_location=reading.map_location, trust=False, limits=reading.limits)
        raise
    except UnsafeFileError as err:
        if not err.globals:
            raise
        names = [f.detail for f in scan(path, limits=reading.limits).findings if f.kind == "import"]
        raise UnsafeFileError(
            path, names or err.globals, member=err.member, offset=err.offset, opcode=err.opcode
        ) from None


def allow_placeholders(
    path: Path, content: Any, saved: Saved, reading: Reading, *, allowed: Collection[str] | None
) -> Any:
    """Refuse placeholders outside the ``allowed`` top-level keys; rebuild and note the others.

    Args:
        allowed: the top-level keys where placeholders may be; ``None``
            when the whole file is configuration (``training_args.bin``).

    Returns:
        ``content`` with the entries under ``allowed`` rebuilt as ``reading.rebuild`` asks.

    Raises:
        UnsafeFileError: a placeholder elsewhere (in weights or optimizer
            state): the file needs code to load, as without placeholders.
    """
    if allowed is None:
        entries: list[tuple[str, Any]] = [(path.name, content)]
    elif isinstance(content, Mapping):
        entries = [(key, value) for key, value in content.items() if key in allowed]
        outside = [(str(key), o) for key, value in content.items() for _, o in find_opaque(key)]
        outside += [
            (f"{key}{where}", o)
            for key, value in content.items()
            if key not in allowed
            for where, o in find_opaque(value)
        ]
        if outside:
            raise _refusal(path, outside)
    else:
        entries = []
        found = list(find_opaque(content))
        if found:
            raise _refusal(path, found)
    rebuilt = content
    for key, value in entries:
        if reading.rebuild:
            value = rebuild(value, reading.rebuild)
            if allowed is None:
                rebuilt = value
            else:
                rebuilt = dict(rebuilt) if rebuilt is content else rebuilt
                rebuilt[key] = value
        saved.placeholders.extend(f"{key}{where}: {o.name}" for where, o in find_opaque(value))
    if saved.placeholders:
        logger.info(
            "%s: %d object(s) that need code to build came back as inert placeholders (nothing ran): %s",
            path,
            len(saved.placeholders),
            "; ".join(saved.placeholders[:5]),
        )
    return rebuilt


def _refusal(path: Path, outside: list[tuple[str, Opaque]]) -> UnsafeFileError:
    names = sorted({o.name for _, o in outside})
    where = ", ".join(w or "the whole file" for w, _ in outside[:3])
    return UnsafeFileError(
        path,
        names,
        reason=f"would import {', '.join(names[:6])} to build {where}: outside the hyper-parameter entries "
        f"({', '.join(sorted(HYPER_PARAMETER_KEYS)[:5])}, …), the only places where torchkeep returns such "
        "objects as inert placeholders",
    )

"""Reading a run folder: list, verify, latest, best, open. Reads only.

Nothing here creates, deletes, renames or locks anything, or joins a process
group, so ``torchkeep ls`` / ``verify``, ``consolidate``, ``summarize`` and a
``Checkpointer``'s ``list`` / ``best`` / ``latest`` can look at a run while
its writer saves: a save in flight lives under a hidden name (or, on an
object store, has no manifest yet) and is simply not listed; a checkpoint
that the writer's retention removes while it is being read drops out of the
listing instead of showing as damaged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import TorchkeepError
from torchkeep.run.blobs import fetch_packs, local_size, pack_owner, read_indexed, verify_packs
from torchkeep.run.layout import (
    BLOBS,
    FORMAT_VERSION,
    MANIFEST,
    MODEL,
    READABLE,
    TENSOR_INDEX,
    is_step,
    manifest_version,
    nonfinite_of,
    step_name,
    step_of,
)
from torchkeep.storage.base import Store, open_store
from torchkeep.storage.manifest import Verdict, check_files, parse_manifest, verify_folder
from torchkeep.storage.remote import is_url

__all__ = [
    "CheckpointEntry",
    "RunReader",
    "check_version",
    "indexed_model",
    "is_number",
    "is_run_folder",
    "metric_value",
    "model_file",
    "open_local",
    "rank",
    "step_folder",
    "verify_step",
]

logger = logging.getLogger(__name__)


def metric_value(value: Any) -> float | None:
    """A metric as a float (tensors and NumPy scalars too); ``None`` for NaN or non-numbers."""
    import math

    if hasattr(value, "numel") and hasattr(value, "item"):
        value = value.detach().float().item() if value.numel() == 1 else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def is_number(value: Any) -> bool:
    """Whether a metric given is a number (so ``None`` from :func:`metric_value` means NaN/Inf)."""
    if hasattr(value, "numel") and hasattr(value, "item"):
        return bool(value.numel() == 1)
    return isinstance(value, (int, float)) or type(value).__module__ == "numpy"


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint folder of a run, as a listing sees it.

    Attributes:
        path: the folder (a URL string for a remote run).
        step: its step.
        epoch: its epoch, if saved.
        created: when it was committed (ISO 8601, UTC).
        size: bytes of the whole checkpoint (its folder, and the run's packs it uses).
        new: bytes its own save added to the run (its folder and its pack); the rest of
            ``size`` is shared with other checkpoints (equal to ``size`` for a standalone one).
        metrics: the metrics saved with it.
        valid: whether it verified.
        reason: why not, when it did not.
        nonfinite: what held NaN/Inf at save (``{"tensors": [...], "metrics": [...]}``).
        version: its format version (``None`` when unreadable).
    """

    path: Path | str
    step: int
    epoch: int | None = None
    created: str | None = None
    size: int = 0
    new: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    valid: bool = True
    reason: str = ""
    nonfinite: dict[str, list[str]] = field(default_factory=dict)
    version: int | None = None

    @property
    def name(self) -> str:
        """The folder's name, e.g. ``step-00000120``."""
        return step_name(self.step)

    @property
    def poisoned(self) -> bool:
        """Whether its model tensors or metrics held NaN/Inf at save (never ranked best)."""
        return bool(self.nonfinite)


def rank(entries: Sequence[CheckpointEntry], monitor: str | None, mode: str = "min") -> list[CheckpointEntry]:
    """Valid, finite checkpoints that carry ``monitor``, best first (ties: the newer one)."""
    if monitor is None:
        return []
    scored = [(metric_value(e.metrics.get(monitor)), e) for e in entries if e.valid and not e.poisoned]
    usable = [(v, e) for v, e in scored if v is not None]
    sign = 1.0 if mode == "min" else -1.0
    usable.sort(key=lambda ve: (sign * ve[0], -ve[1].step))
    return [e for _, e in usable]


def check_version(manifest: dict[str, Any] | None) -> tuple[int | None, str]:
    """The manifest's format version and, when this torchkeep cannot read it, why."""
    version = manifest_version(manifest or {})
    if version is None:
        return None, "manifest.json is not a torchkeep checkpoint manifest"
    if version not in READABLE:
        if version > FORMAT_VERSION:
            return version, f"written by a newer torchkeep (format {version}; this one reads {READABLE})"
        return version, f"format version {version} is not readable by this torchkeep"
    return version, ""


class RunReader:
    """A read-only view of a run folder (local or a URL).

    Args:
        directory (str | PathLike): the run folder or its URL.
        storage_options (Mapping | None, default None): fsspec options for a URL.

    Example:
        >>> reader = RunReader("runs/exp1")
        >>> reader.best("val_loss"), reader.latest()
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, storage_options: Any = None, store: Store | None = None
    ) -> None:
        self.store = store if store is not None else open_store(directory, storage_options)

    @property
    def directory(self) -> Path | str:
        """The run folder (a URL for a remote run)."""
        return Path(self.store.url) if self.store.atomic_publish else self.store.url

    def steps(self) -> list[int]:
        """The steps whose folders are there (committed ones, on an object store), oldest first."""
        return sorted(s for s in (step_of(n) for n in self.store.folders()) if s is not None)

    def entries(self, *, verify: bool = False) -> list[CheckpointEntry]:
        """Every checkpoint, oldest first.

        Args:
            verify (bool, default False): check the digests too (reads every
                file); without it, only that each file has its size.
        """
        packs: dict[str, int] | None = None

        def pack_size(ref: str) -> int | None:
            nonlocal packs
            if packs is None or ref not in packs:  # listed once, and again for a pack written since
                packs = {f"{BLOBS}/{n}": size for n, size in (self.store.sizes(BLOBS) or {}).items()}
            return packs.get(ref)

        found = (self._entry(step, checksums=verify, pack_size=pack_size) for step in self.steps())
        return [entry for entry in found if entry is not None]

    def _entry(
        self, step: int, *, checksums: bool, pack_size: Callable[[str], int | None]
    ) -> CheckpointEntry | None:
        name, store = step_name(step), self.store
        sizes = store.sizes(name)
        if sizes is None:
            return None  # removed since the listing
        if MANIFEST not in sizes and not store.atomic_publish:
            return None  # an upload in progress (or a crashed one): not a checkpoint yet
        try:
            verdict = self._verdict(name, sizes, checksums=checksums, pack_size=pack_size)
        except FileNotFoundError as err:  # a file went between the listing and its read
            verdict = Verdict(False, f"{err.filename or err} vanished while it was read")
        except (ValueError, UnicodeDecodeError, TorchkeepError) as err:  # pragma: no cover - defensive
            verdict = Verdict(False, f"cannot be read ({err})")
        if not verdict.ok and store.sizes(name) is None:
            return None  # removed while it was read
        manifest = verdict.manifest or {}
        version, problem = check_version(manifest) if verdict.ok else (None, "")
        metrics = manifest.get("metrics")
        own = sum(sizes.values())
        packs = manifest.get(BLOBS)
        used = (
            {r: e.get("size", 0) for r, e in packs.items() if isinstance(e, dict)}
            if isinstance(packs, dict)
            else {}
        )
        mine = sum(n for ref, n in used.items() if pack_owner(ref) == name and isinstance(n, int))
        return CheckpointEntry(
            path=store.public(name),
            step=step,
            epoch=manifest.get("epoch"),
            created=manifest.get("created"),
            size=own + sum(n for n in used.values() if isinstance(n, int)),
            new=own + mine,
            metrics=dict(metrics) if isinstance(metrics, dict) else {},
            valid=verdict.ok and not problem,
            reason=verdict.reason or problem,
            nonfinite=nonfinite_of(manifest),
            version=version,
        )

    def _verdict(
        self, name: str, sizes: dict[str, int], *, checksums: bool, pack_size: Callable[[str], int | None]
    ) -> Verdict:
        if MANIFEST not in sizes:
            return Verdict(False, "no manifest.json (an unfinished or damaged checkpoint)")
        if checksums:
            with self.open(name) as folder:
                return verify_step(folder)
        try:
            manifest = parse_manifest(self.store.read(name, MANIFEST))
        except (ValueError, UnicodeDecodeError) as err:
            return Verdict(False, f"manifest.json is not valid ({err})")
        except FileNotFoundError:
            return Verdict(False, "no manifest.json (an unfinished or damaged checkpoint)")
        verdict = check_files(manifest, sizes.get)
        return verify_packs(None, manifest, pack_size, checksums=False) if verdict.ok else verdict

    def latest(self) -> Path | str | None:
        """The newest checkpoint whose files are all there (sizes checked)."""
        for entry in reversed(self.entries()):
            if entry.valid:
                return entry.path
        return None

    def best(self, monitor: str | None, mode: str = "min") -> Path | str | None:
        """The best valid, finite checkpoint by ``monitor`` (``None`` when none carries it)."""
        ranked = rank(self.entries(), monitor, mode)
        return ranked[0].path if ranked else None

    def name_of(self, path: str | os.PathLike[str]) -> str:
        """The step folder name of a checkpoint path or URL of this run."""
        return self.store.name_of(path)

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[Path]:
        """A local folder holding checkpoint ``name``'s files (a download for a remote run, with the
        packs it uses beside it)."""
        with self.store.local(name) as folder, fetch_packs(self.store, folder):
            yield folder


@contextlib.contextmanager
def open_local(path: str | os.PathLike[str], storage_options: Any = None) -> Iterator[Path]:
    """The file or folder at ``path`` as a local path (a download, for a URL); a checkpoint folder
    of a remote run comes with the packs it uses beside it, so it reads as a whole checkpoint."""
    text = os.fspath(path)
    if is_url(text):
        parent, _, name = text.rstrip("/").rpartition("/")
        if is_step(name) and parent:
            reader = RunReader(parent, storage_options=storage_options)
            if name in reader.store.folders():  # committed
                with reader.open(name) as folder:
                    yield folder
                return
    with open_store(text, storage_options).fetch("", allow_folder=True) as local:
        yield local


def verify_step(folder: Path, *, checksums: bool = True) -> Verdict:
    """Check a local checkpoint folder: its manifest's files and the packs it uses (sizes; with
    ``checksums``, every file's digest and every tensor's digest in the packs)."""
    verdict = verify_folder(folder, checksums=checksums)
    if not verdict.ok or verdict.manifest is None:
        return verdict
    return verify_packs(folder, verdict.manifest, local_size(folder.parent), checksums=checksums)


def is_run_folder(path: Path) -> bool:
    """Whether a local folder holds checkpoint folders (``step-…``)."""
    try:
        return path.is_dir() and any(is_step(p.name) and p.is_dir() for p in path.iterdir())
    except OSError:
        return False


def indexed_model(path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]] | None:
    """The model tensors of an incremental checkpoint folder (or of a run folder's newest valid
    checkpoint), mapped from its packs and not yet read, with their header metadata; tied
    weights appear once, as in a ``model.safetensors``. ``None`` for any other folder."""
    folder = step_folder(path)
    if folder is None or not (folder / TENSOR_INDEX).is_file():
        return None
    found = read_indexed(folder, MODEL, device=torch.device("cpu"))
    return None if found is None else (folder, *found)


def model_file(path: Path) -> Path | None:
    """The ``model.safetensors`` of a checkpoint folder, or of a run folder's newest valid checkpoint."""
    folder = step_folder(path)
    return folder / MODEL if folder is not None and (folder / MODEL).is_file() else None


def step_folder(path: Path) -> Path | None:
    """``path`` if it is a checkpoint folder; its newest valid checkpoint if it is a run folder."""
    if (path / MANIFEST).is_file():
        return path
    if is_run_folder(path):
        latest = RunReader(path).latest()
        return Path(latest) if latest is not None else None
    return None

"""Packs: a run's tensor data, each distinct tensor stored once, shared by its checkpoints.

An incremental checkpoint keeps no tensor bytes in its own folder. Its
``tensors.json`` lists, for each of its tensor files (``model.safetensors``,
``state.safetensors``), every tensor's content digest
(:func:`~torchkeep.storage.digests.tensor_digest`) and header metadata, and the
pack holding each digest. A pack (``blobs/step-00000120-3fa9c2d1.safetensors``)
is a standard safetensors file whose tensor names are digests; a save writes
one pack holding only the tensors no pack of the run holds yet (none at all
when nothing changed), so a frozen backbone is written by the first save only.
The tensors are hashed by the saving thread and, where the process has a
second CPU, a helper working from the other end of the list; once a batch
of new tensors is known a writer thread writes it while the hashing goes
on, so a save where everything changed costs about what writing it costs,
and a save where nothing did costs what reading it once costs. The pack's
header, known once every tensor is decided, is written last into room kept
at the start of the file (:func:`~torchkeep.storage.tensorfile.write_chosen`).

Safety of shared data, step by step:

- *save*: the pack is written, fsynced and renamed into ``blobs/`` before the
  checkpoint that uses it is published; a crash in between leaves a pack that
  no checkpoint uses, which the writer deletes later.
- *retention*: checkpoints are removed first; then every pack that no
  checkpoint folder in the run uses is deleted (:func:`collect`). A pack is
  therefore never deleted while a kept checkpoint refers to it, whatever the
  moment of a crash, and a reader that has opened a pack keeps reading it.
- *verify*: every pack a checkpoint uses must have the size its manifest
  records, and with checksums every tensor it uses must hash to its digest.

Only the run's writer (holding the writer lock) writes or deletes packs;
readers only read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import TorchkeepError
from torchkeep.run.layout import BLOBS, MANIFEST, MODEL, STATE_TENSORS, TENSOR_INDEX, is_step, step_name
from torchkeep.storage.atomic import TEMP_MARKER
from torchkeep.storage.base import Store
from torchkeep.storage.digests import DIGEST_HEX_LENGTH, is_digest, tensor_digest
from torchkeep.storage.manifest import DIGEST, FileRecord, Verdict, file_record, write_json
from torchkeep.storage.tensorfile import read_safetensors, write_chosen
from torchkeep.weights import _view_identity

__all__ = [
    "BlobIndex",
    "IndexedFile",
    "VersionToken",
    "collect",
    "fetch_packs",
    "is_pack_ref",
    "local_size",
    "pack_owner",
    "pack_refs",
    "read_index",
    "read_indexed",
    "read_indexed_files",
    "verify_packs",
    "version_token",
    "write_ahead",
    "write_indexed",
]

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
TENSOR_FILES = (MODEL, STATE_TENSORS)  # the tensor files an index may describe
_PACK_REF = re.compile(rf"^{BLOBS}/[A-Za-z0-9][A-Za-z0-9._-]{{0,200}}\.safetensors$")
_PACK_META = {"format": "pt", "torchkeep.pack": str(INDEX_VERSION)}
_INDEX_MAX_BYTES = 256 << 20

# (version counter, storage bytes, the view's identity: weights._view_identity)
VersionToken = tuple[int, int, tuple[Any, ...]]


def is_pack_ref(ref: object) -> bool:
    """Whether ``ref`` names a pack of a run (``blobs/<name>.safetensors``, nothing outside ``blobs/``)."""
    return isinstance(ref, str) and _PACK_REF.fullmatch(ref) is not None and ".." not in ref


def version_token(t: torch.Tensor, storage: torch.UntypedStorage | None = None) -> VersionToken:
    """What identifies ``t``'s memory and its last in-place change, as torch counts them
    (``storage``: ``t``'s, where the caller has it already)."""
    if storage is None:
        storage = t.untyped_storage()
    return (t._version, storage.nbytes(), _view_identity(t, storage))


@dataclass(frozen=True)
class IndexedFile:
    """One tensor file of an incremental checkpoint: its tensors' digests and header metadata."""

    tensors: dict[str, str]
    metadata: dict[str, str]


@dataclass
class _Seen:
    token: VersionToken
    digest: str
    storage: torch.UntypedStorage  # held so no other tensor can take this address meanwhile


def _manifest_packs(manifest: object) -> dict[str, dict[str, Any]] | None:
    """The ``blobs`` table of a parsed manifest, if it is well formed."""
    recorded = manifest.get(BLOBS) if isinstance(manifest, dict) else None
    if not isinstance(recorded, dict):
        return None
    good = {
        ref: entry
        for ref, entry in recorded.items()
        if is_pack_ref(ref)
        and isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get(DIGEST), str)
    }
    return good if len(good) == len(recorded) else None


def _flagged(manifest: dict[str, Any]) -> list[str]:
    found = manifest.get("nonfinite")
    names = found.get("tensors") if isinstance(found, dict) else None
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


@dataclass
class BlobIndex:
    """The writer's view of a run's packs: where each digest is stored, and what uses which pack.

    Built from the run's checkpoint folders each time the writer takes the
    run's lock, then kept up to date by the writer alone.
    """

    where: dict[str, str] = field(default_factory=dict)  # digest -> pack ref
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # pack ref -> size and digest
    nonfinite: set[str] = field(default_factory=set)  # digests holding NaN/Inf (model tensors)
    uses: dict[str, set[str]] = field(default_factory=dict)  # step folder -> pack refs it uses
    seen: dict[str, _Seen] = field(default_factory=dict)  # "file:key" -> the last save's token
    checked: set[str] = field(default_factory=set)  # packs known whole: written or re-read here

    @classmethod
    def load(cls, store: Store) -> BlobIndex:
        """The packs of the run's checkpoint folders (of those whose packs are all there)."""
        index = cls()
        present = {f"{BLOBS}/{name}": size for name, size in (store.sizes(BLOBS) or {}).items()}
        for name in store.folders():
            if not is_step(name):
                continue
            try:
                parsed = read_index(store.read(name, TENSOR_INDEX))
                manifest = json.loads(store.read(name, MANIFEST))
            except (FileNotFoundError, ValueError, UnicodeDecodeError):
                continue  # standalone, unfinished or damaged: nothing to share from it
            recorded = _manifest_packs(manifest)
            refs = set(parsed.packs.values())
            index.uses[name] = refs
            if recorded is None or not all(
                ref in recorded and present.get(ref) == recorded[ref]["size"] for ref in refs
            ):
                continue  # a pack is missing or damaged: never point a new checkpoint at it
            index.where.update(parsed.packs)
            index.records.update({ref: dict(recorded[ref]) for ref in refs})
            model = parsed.files.get(MODEL)
            if model is not None:
                index.nonfinite.update(model.tensors[k] for k in _flagged(manifest) if k in model.tensors)
        return index

    def usable(self, digest: str, store: Store) -> bool:
        """Whether a new checkpoint may refer to the stored ``digest``.

        The first time a pack this writer did not write is reused, a local
        pack is read back and checked against its recorded digest, so damage
        that kept its size is not carried into new checkpoints (a damaged pack
        is forgotten and its tensors written anew). Packs on object stores are
        trusted by size (the store checks uploads).
        """
        ref = self.where.get(digest)
        if ref is None:
            return False
        if ref in self.checked or not store.in_place:
            return True
        self.checked.add(ref)
        recorded = self.records.get(ref, {})
        try:
            with store.fetch(ref) as local:
                whole = file_record(local, mapped=True).digest == recorded.get(DIGEST)
        except (OSError, TorchkeepError):
            whole = False
        if not whole:
            logger.warning("%s does not match its checksum: its tensors are stored again", ref)
            self.forget({ref})
        return whole

    def forget(self, refs: set[str]) -> None:
        """Drop deleted or damaged packs (and every digest stored in them)."""
        if not refs:
            return
        self.where = {d: ref for d, ref in self.where.items() if ref not in refs}
        for ref in refs:
            self.records.pop(ref, None)


@dataclass(frozen=True)
class Index:
    """A parsed ``tensors.json``."""

    files: dict[str, IndexedFile]
    packs: dict[str, str]  # digest -> pack ref


def read_index(text: str | bytes) -> Index:
    """Parse and check ``tensors.json``: only the tensor files a checkpoint has, every digest well
    formed and in a pack inside ``blobs/``, every name and metadata entry text.

    The result is shared by callers passing the same text (a restore checks, then reads): treat
    it as read-only.

    Raises:
        ValueError: it is not a valid index.
    """
    return _parsed_index(text if isinstance(text, bytes) else text.encode("utf-8"))


@functools.lru_cache(maxsize=8)
def _parsed_index(text: bytes) -> Index:
    if len(text) > _INDEX_MAX_BYTES:
        raise ValueError(f"{TENSOR_INDEX} is larger than {_INDEX_MAX_BYTES} bytes")
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
        raise ValueError(f"{TENSOR_INDEX} is not a version-{INDEX_VERSION} tensor index")
    packs, files = data.get("packs"), data.get("files")
    if not isinstance(packs, dict) or not isinstance(files, dict):
        raise ValueError(f"{TENSOR_INDEX} has no 'packs' or 'files' table")
    for digest, ref in packs.items():
        if not is_digest(digest) or not is_pack_ref(ref):
            raise ValueError(f"{TENSOR_INDEX} names an invalid pack entry {digest!r}: {ref!r}")
    parsed: dict[str, IndexedFile] = {}
    for name, entry in files.items():
        if name not in TENSOR_FILES:
            raise ValueError(f"{TENSOR_INDEX} names a tensor file {name!r}; a checkpoint has {TENSOR_FILES}")
        tensors = entry.get("tensors") if isinstance(entry, dict) else None
        metadata = entry.get("metadata", {}) if isinstance(entry, dict) else None
        if not isinstance(tensors, dict) or not isinstance(metadata, dict):
            raise ValueError(f"{TENSOR_INDEX}: entry {name!r} is not a tensor file")
        for key, digest in tensors.items():
            if not isinstance(digest, str) or digest not in packs:
                raise ValueError(f"{TENSOR_INDEX}: {name} {key!r} names no stored tensor")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"{TENSOR_INDEX}: the metadata of {name} is not text")
        parsed[name] = IndexedFile(dict(tensors), dict(metadata))
    return Index(parsed, dict(packs))


def local_size(run: Path) -> Callable[[str], int | None]:
    """``size_of(ref)`` for the packs of the local run folder ``run``."""

    def size_of(ref: str) -> int | None:
        try:
            return (run / ref).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    return size_of


def pack_refs(folder: Path) -> set[str]:
    """The packs the checkpoint ``folder`` uses (empty for a standalone one, or when its index
    cannot be read: verifying the folder says why)."""
    try:
        return set(read_index((folder / TENSOR_INDEX).read_bytes()).packs.values())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return set()


# -- writing -------------------------------------------------------------------------------------


Versions = Mapping[str, tuple[VersionToken, torch.UntypedStorage]]


def _known_digest(name: str, key: str, versions: Versions | None, index: BlobIndex) -> str | None:
    """The last save's digest of ``name:key`` when torch counted no change since (``versions``)."""
    seen = index.seen.get(f"{name}:{key}")
    mine = versions.get(key) if versions is not None else None
    if mine is not None and seen is not None and seen.token == mine[0] and seen.digest in index.where:
        return seen.digest
    return None


def write_indexed(
    folder: Path,
    files: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, str], bool]],
    *,
    step: int,
    store: Store,
    index: BlobIndex,
    durable: bool,
    versions: Mapping[str, Versions | None] | None = None,
    known: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[dict[str, dict[str, Any]], list[str], FileRecord]:
    """Write the tensors no pack holds yet as one new pack, and ``tensors.json`` into ``folder``.

    ``files`` maps each tensor file's name to (tensors, header metadata,
    check for NaN/Inf). ``versions`` (file -> key -> (token, storage)) lets a
    tensor whose token equals the last save's keep that save's digest
    without being read. ``known`` (file -> key -> digest) names tensors of
    the checkpoint already stored by :func:`write_ahead`.

    Returns:
        The manifest's ``blobs`` table (each pack used, with its size and
        digest), the non-finite tensors of the files checked for them, and
        the manifest record of ``tensors.json``.
    """
    versions = versions or {}
    slots = [(name, key) for name, (tensors, _, _) in files.items() for key in tensors]
    found = _store_new(
        [files[name][0][key] for name, key in slots],
        [_known_digest(name, key, versions.get(name), index) for name, key in slots],
        [i for i, (name, _) in enumerate(slots) if files[name][2]],
        step=step,
        store=store,
        index=index,
        durable=durable,
    )
    digests: dict[str, dict[str, str]] = {name: {} for name in files}
    for (name, key), digest in zip(slots, found, strict=True):
        digests[name][key] = digest
    for name, given in (known or {}).items():
        digests.setdefault(name, {}).update(given)
    seen: dict[str, _Seen] = {}  # what torch counted for each tensor, for the next save's fast path
    for name in files:  # (only this save's: a storage no longer saved is not held)
        for key, (token, storage) in (versions.get(name) or {}).items():
            seen[f"{name}:{key}"] = _Seen(token, digests[name][key], storage)
    index.seen = seen
    used = sorted({d for per in digests.values() for d in per.values()})
    packs = {d: index.where[d] for d in used}
    content = {
        "version": INDEX_VERSION,
        "files": {
            name: {"tensors": digests[name], "metadata": dict(meta)} for name, (_, meta, _) in files.items()
        },
        "packs": packs,
    }
    record = write_json(folder / TENSOR_INDEX, content, durable=durable)
    nonfinite = [
        key
        for name, (_, _, check) in files.items()
        if check
        for key, digest in digests[name].items()
        if digest in index.nonfinite
    ]
    blobs = {ref: dict(index.records[ref]) for ref in sorted(set(packs.values()))}
    return blobs, nonfinite, record


def _store_new(
    tensors: list[torch.Tensor],
    given: list[str | None],
    check: list[int],
    *,
    step: int,
    store: Store,
    index: BlobIndex,
    durable: bool,
) -> list[str]:
    """Store the ``tensors`` (contiguous CPU tensors) no pack holds yet, as one new pack; return
    each one's digest.

    ``given[i]``, where not ``None``, is tensor ``i``'s digest, known without
    reading it. The others are hashed (on two threads) while the new ones
    are written (:func:`~torchkeep.storage.tensorfile.write_chosen`), so a save
    where everything changed costs about what writing it costs. ``check``
    names the tensors to look at for NaN/Inf (the model's).
    """
    digests: list[str] = [d or "" for d in given]
    chosen: set[str] = set()

    def prepare(i: int, t: torch.Tensor) -> None:
        digests[i] = tensor_digest(t)

    def choose(i: int, t: torch.Tensor) -> str | None:
        digest = digests[i]
        if digest in chosen or index.usable(digest, store):
            return None
        chosen.add(digest)
        return digest

    ref = f"{BLOBS}/{step_name(step)}-{secrets.token_hex(4)}.safetensors"
    with contextlib.ExitStack() as stack:

        def open_pack() -> int:
            tmp = stack.enter_context(store.stage(ref, durable=durable))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            stack.callback(os.close, fd)
            return fd

        written = write_chosen(
            open_pack,
            tensors,
            choose,
            _PACK_META,
            name_length=DIGEST_HEX_LENGTH,
            prepare=prepare,
            unprepared={i for i, d in enumerate(given) if d is None},
            digest=DIGEST,
            check_finite=check,
        )
    result = written.result
    if result is None:
        return digests
    index.where.update(dict.fromkeys(chosen, ref))
    index.records[ref] = {"size": result.size, DIGEST: result.digest}
    index.checked.add(ref)
    index.nonfinite.update(result.nonfinite)
    logger.info("stored %d new tensors (%d bytes) in %s", len(chosen), result.size, ref)
    return digests


def write_ahead(
    tensors: Mapping[str, torch.Tensor],
    *,
    step: int,
    store: Store,
    index: BlobIndex,
    durable: bool,
    chunk_bytes: int,
) -> dict[str, str]:
    """Store live tensors now, before a save returns (those an async save could not stage).

    Each is copied to host memory only when on another device or strided,
    and they are stored (:func:`_store_new`) in groups of about
    ``chunk_bytes`` (a larger tensor alone), so host memory stays within
    ``chunk_bytes`` plus the largest tensor. Returns each name's digest.
    """
    digests: dict[str, str] = {}
    names: list[str] = []
    chunk: list[torch.Tensor] = []
    size = 0

    def store_chunk() -> None:
        found = _store_new(
            chunk, [None] * len(chunk), [], step=step, store=store, index=index, durable=durable
        )
        digests.update(zip(names, found, strict=True))
        names.clear()
        chunk.clear()

    for name, t in tensors.items():
        host = t.detach().to("cpu").contiguous()  # one host copy, only for another device or strides
        if chunk and size + host.nbytes > chunk_bytes:
            store_chunk()
            size = 0
        names.append(name)
        chunk.append(host)
        size += host.nbytes
    if chunk:
        store_chunk()
    return digests


# -- reading -------------------------------------------------------------------------------------


def read_indexed(
    folder: Path, name: str, *, device: torch.device, mmap: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The tensors and header metadata of tensor file ``name`` of an incremental checkpoint.

    ``None`` when ``folder`` is not incremental or has no such file. Every
    key gets a tensor of its own (two keys holding equal values do not share
    memory); the packs are mapped, so nothing is read until used.

    Raises:
        CorruptFileError: the index or a pack is damaged or missing a tensor.
    """
    return read_indexed_files(folder, (name,), device=device, mmap=mmap).get(name)


def read_indexed_files(
    folder: Path, names: Collection[str], *, device: torch.device, mmap: bool = True
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """:func:`read_indexed` for several tensor files at once: each pack is opened once, and only
    the tensors asked for are made. Files the checkpoint does not have are left out (none at
    all for a standalone checkpoint)."""
    from torchkeep.errors import CorruptFileError
    from torchkeep.formats import read_safetensors_header

    try:
        index = read_index((folder / TENSOR_INDEX).read_bytes())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptFileError(folder / TENSOR_INDEX, str(err)) from err
    entries = {name: index.files[name] for name in names if name in index.files}
    needed: dict[str, set[str]] = {}
    for entry in entries.values():
        for digest in entry.tensors.values():
            needed.setdefault(index.packs[digest], set()).add(digest)
    by_digest: dict[str, torch.Tensor] = {}
    for ref, wanted in needed.items():
        path = folder.parent / ref
        try:
            header = read_safetensors_header(path)
            stored = read_safetensors(path, header, device=device, mmap=mmap, names=wanted)
        except FileNotFoundError as err:
            raise CorruptFileError(path, f"the pack is missing ({err})") from err
        missing = wanted - set(stored)
        if missing:
            raise CorruptFileError(path, f"the pack does not hold {len(missing)} tensor(s) the index names")
        by_digest.update(stored)
    out: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
    used: set[str] = set()
    for name, entry in entries.items():
        tensors: dict[str, torch.Tensor] = {}
        for key, digest in entry.tensors.items():
            t = by_digest[digest]
            tensors[key] = t.clone() if digest in used else t  # equal values, separate tensors
            used.add(digest)
        out[name] = (tensors, dict(entry.metadata))
    return out


@contextlib.contextmanager
def fetch_packs(store: Store, folder: Path) -> Iterator[None]:
    """Make the packs a downloaded checkpoint ``folder`` uses readable beside it (no-op locally).

    A pack that cannot be downloaded is left out; verifying the folder then says it is missing.
    """
    if store.in_place:
        yield
        return
    refs = pack_refs(folder)
    placed: list[Path] = []
    try:
        for ref in sorted(refs):
            target = folder.parent / ref
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with store.fetch(ref) as local:
                    shutil.move(os.fspath(local), target)
            except FileNotFoundError:  # gone (pruned meanwhile, or lost): reported by verification
                continue
            placed.append(target)
        yield
    finally:
        for path in placed:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def verify_packs(
    folder: Path | None, manifest: Mapping[str, Any], size_of: Callable[[str], int | None], *, checksums: bool
) -> Verdict:
    """Check the packs an incremental checkpoint uses: recorded, present, the size its manifest
    says, and (``checksums``, with ``folder``) the XXH3-128 its manifest records.

    ``folder`` (the checkpoint's local folder; ``None``: sizes only) lets
    its ``tensors.json`` be checked against the manifest too.
    """
    recorded = manifest.get(BLOBS) or {}
    if not isinstance(recorded, dict):
        return Verdict(False, "manifest.json has an invalid 'blobs' table", dict(manifest))
    for ref, entry in recorded.items():
        if not is_pack_ref(ref) or not isinstance(entry, dict) or not isinstance(entry.get(DIGEST), str):
            return Verdict(False, f"manifest.json lists an invalid pack {ref!r}", dict(manifest))
        size = size_of(ref)
        if size is None:
            return Verdict(False, f"{ref} is missing (a pack this checkpoint uses)", dict(manifest))
        if size != entry.get("size"):
            return Verdict(
                False, f"{ref} has {size} bytes, the manifest says {entry.get('size')}", dict(manifest)
            )
    if folder is None or not (folder / TENSOR_INDEX).is_file():
        return Verdict(True, "", dict(manifest))
    try:
        index = read_index((folder / TENSOR_INDEX).read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        return Verdict(False, f"{TENSOR_INDEX} is not valid ({err})", dict(manifest))
    unlisted = set(index.packs.values()) - set(recorded)
    if unlisted:
        return Verdict(
            False, f"{TENSOR_INDEX} uses packs its manifest does not list: {sorted(unlisted)}", dict(manifest)
        )
    if checksums:
        wanted: dict[str, set[str]] = {}
        for digest, ref in index.packs.items():
            wanted.setdefault(ref, set()).add(digest)
        for ref, entry in sorted(recorded.items()):
            try:
                whole = _pack_checks_out(folder.parent / ref, entry[DIGEST], wanted.get(ref, set()))
            except FileNotFoundError:
                return Verdict(False, f"{ref} is missing (a pack this checkpoint uses)", dict(manifest))
            except (OSError, TorchkeepError) as err:
                return Verdict(False, f"{ref} cannot be read ({err})", dict(manifest))
            if not whole:
                return Verdict(
                    False, f"{ref} does not match its {DIGEST} checksum (its content changed)", dict(manifest)
                )
    return Verdict(True, "", dict(manifest))


def _pack_checks_out(path: Path, recorded: str, used: set[str]) -> bool:
    """Whether the tensors a checkpoint uses in pack ``path`` are as written: the whole file against
    its recorded digest when the checkpoint uses most of it, else each used tensor against its own
    (content) digest, so a checkpoint that shares one small tensor of a large pack reads that only."""
    from torchkeep.formats import read_safetensors_header

    header = read_safetensors_header(path)
    sizes = {t.name: t.nbytes for t in header.tensors}
    if 2 * sum(sizes.get(d, 0) for d in used) >= sum(sizes.values()):
        return bool(file_record(path, mapped=True).digest == recorded)
    if not used <= set(sizes):
        return False
    stored = read_safetensors(path, header, device=torch.device("cpu"), mmap=True, names=used)
    return all(tensor_digest(stored[d]) == d for d in used)


# -- deleting ------------------------------------------------------------------------------------


def pack_owner(ref: str) -> str:
    """The step folder whose save wrote pack ``ref`` (``blobs/step-00000120-….safetensors``)."""
    return ref.removeprefix(f"{BLOBS}/").rsplit("-", 1)[0]


# what atomic_target leaves of a killed pack write: .<pack>.tmp-<hex>/<pack>
_LEFTOVER = re.compile(
    rf"^\.[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors{re.escape(TEMP_MARKER)}[0-9a-f]+/[A-Za-z0-9._-]+$"
)


def collect(store: Store, index: BlobIndex, *, durable: bool) -> list[str]:
    """Delete every pack (and leftover temporary pack) that no checkpoint folder uses.

    Only the writer calls this, between saves. Standalone checkpoints use no
    pack. When a checkpoint's ``tensors.json`` cannot be read, nothing is
    deleted (what it used is unknown) and a warning says which.
    """
    present = store.sizes(BLOBS)
    if not present:
        return []
    folders = [name for name in store.folders() if is_step(name)]
    for name in set(index.uses) - set(folders):
        del index.uses[name]
    used: set[str] = set()
    for name in folders:
        if name not in index.uses:
            try:
                index.uses[name] = set(read_index(store.read(name, TENSOR_INDEX)).packs.values())
            except FileNotFoundError:
                index.uses[name] = set()
            except (ValueError, UnicodeDecodeError) as err:
                logger.warning("%s: %s cannot be read (%s); no pack is deleted", name, TENSOR_INDEX, err)
                return []
        used |= index.uses[name]
    ours = [f"{BLOBS}/{n}" for n in present if is_pack_ref(f"{BLOBS}/{n}") or _LEFTOVER.match(n)]
    unused = sorted(ref for ref in ours if ref not in used)
    if not unused:
        return []
    store.sync()  # the removals of checkpoints reach the disk before the packs they used go
    for ref in unused:
        store.remove_file(ref)
    index.forget(set(unused))
    logger.info("deleted %d pack(s) no checkpoint uses", len(unused))
    return unused

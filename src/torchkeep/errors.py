"""Every error torchkeep raises.

Each error subclasses :class:`TorchkeepError` *and* the builtin that callers
already catch, carries its facts as attributes, and says in its message what
went wrong and what to do next::

    TorchkeepError
    ├── UnreadableFileError              the file cannot be used as asked
    │   ├── ModelFileNotFoundError       (FileNotFoundError)
    │   ├── PathIsDirectoryError         (IsADirectoryError)
    │   ├── WeightsUnavailableError      (FileNotFoundError)
    │   ├── CorruptFileError             (ValueError)
    │   ├── UnsupportedFormatError       (ValueError)
    │   │   └── UnknownFormatError
    │   ├── UnsupportedDtypeError        (TypeError)
    │   ├── NotAStateDictError           (TypeError)
    │   ├── NotAModelError               (TypeError)
    │   └── MissingClassError            (ImportError)
    ├── UnsafeError                      loading it would run code or exceed the limits
    │   ├── UnsafeFileError              (pickle.UnpicklingError; also UntrustedFileError)
    │   └── LimitExceededError           (ValueError)
    ├── DoesNotFitError                  it does not fit the model / objects given
    │   ├── KeyMismatchError             (RuntimeError)
    │   ├── CheckpointMismatchError      (ValueError)
    │   └── NoMatchError                 (ValueError)
    ├── CheckpointError                  a checkpoint run's problem
    │   ├── NoValidCheckpointError       (FileNotFoundError)
    │   ├── NewerFormatError             (ValueError)
    │   ├── AsyncSaveError               (RuntimeError)
    │   ├── RunLockedError               (BlockingIOError)
    │   └── MissingMetricError           (KeyError)
    ├── DistributedError                 a rank of a distributed job failed
    │   └── DistributedSaveError         (RuntimeError)
    └── UsageError                       an argument or environment torchkeep cannot use
        ├── UnsupportedSuffixError       (ValueError)
        ├── InvalidMetadataError         (TypeError)
        ├── UnserializableValueError     (TypeError)
        ├── MissingExtraError            (ImportError)
        ├── UnknownProtocolError         (ValueError)
        ├── InvalidShardSizeError        (ValueError)
        └── ExportError                  (RuntimeError)

    TorchkeepWarning                (UserWarning)
    ├── RngRestoreWarning
    └── NonFiniteCheckpointWarning
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AsyncSaveError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CorruptFileError",
    "DistributedError",
    "DistributedSaveError",
    "DoesNotFitError",
    "ExportError",
    "InvalidMetadataError",
    "InvalidShardSizeError",
    "KeyMismatchError",
    "LimitExceededError",
    "MissingClassError",
    "MissingExtraError",
    "MissingMetricError",
    "ModelFileNotFoundError",
    "NewerFormatError",
    "NoMatchError",
    "NoValidCheckpointError",
    "NonFiniteCheckpointWarning",
    "NotAModelError",
    "NotAStateDictError",
    "PathIsDirectoryError",
    "RngRestoreWarning",
    "RunLockedError",
    "ShapeMismatch",
    "TorchkeepError",
    "TorchkeepWarning",
    "UnknownFormatError",
    "UnknownProtocolError",
    "UnreadableFileError",
    "UnsafeError",
    "UnsafeFileError",
    "UnserializableValueError",
    "UnsupportedDtypeError",
    "UnsupportedFormatError",
    "UnsupportedSuffixError",
    "UntrustedFileError",
    "UsageError",
    "WeightsUnavailableError",
    "first_line",
]

_LIST_LIMIT = 10


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _short_list(items: Sequence[str], limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", … ({len(items) - limit} more)"
    return shown


class TorchkeepError(Exception):
    """Base class of every error raised by torchkeep.

    Example:
        >>> try:
        ...     torchkeep.load_weights("missing.pt")
        ... except torchkeep.TorchkeepError as err:
        ...     print(err)
    """


class UnreadableFileError(TorchkeepError):
    """Group: a file (or folder) could not be read as what was asked for: missing, damaged,
    of an unknown format, or holding something else.

    Example:
        >>> try:
        ...     torchkeep.load_weights(path)
        ... except torchkeep.UnreadableFileError as err:  # any reason the file cannot be used
        ...     print(err)
    """


class UnsafeError(TorchkeepError):
    """Group: a file would run code, or asks for more than the limits allow; nothing was loaded."""


class DoesNotFitError(TorchkeepError):
    """Group: the file is fine but does not fit the model or objects given (keys, shapes, parts)."""


class CheckpointError(TorchkeepError):
    """Group: a problem of a checkpoint run: none valid, a newer format, a failed background
    save, another writer holding the run, a missing metric."""


class DistributedError(TorchkeepError):
    """Group: a rank of a ``torch.distributed`` job failed; every rank raises it."""


class UsageError(TorchkeepError):
    """Group: an argument or an environment torchkeep cannot work with (a suffix, metadata,
    a value that needs pickle, a missing extra, an unknown URL protocol, an export failure)."""


class ModelFileNotFoundError(UnreadableFileError, FileNotFoundError):
    """The path to read does not exist.

    Attributes:
        path: the path that was asked for.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = path
        if isinstance(path, str):  # a URL
            super().__init__(f"{path}: no such object. Check the URL and the storage_options (credentials).")
            return
        hint = ""
        siblings = sorted(p.name for p in path.parent.glob(f"{path.stem}*")) if path.parent.is_dir() else []
        if siblings:
            hint = f" Files with a similar name in {path.parent}: {_short_list(siblings, 5)}."
        super().__init__(f"{path}: no such file.{hint} Check the path and the working directory.")


class PathIsDirectoryError(UnreadableFileError, IsADirectoryError):
    """A directory was given where a file was expected.

    Attributes:
        path: the directory.
    """

    def __init__(self, path: Path, *, action: str = "read") -> None:
        self.path = path
        super().__init__(
            f"{path} is a directory, but a single file is needed to {action}; "
            "pass the path of the file inside it (e.g. model.safetensors)."
        )


class CorruptFileError(UnreadableFileError, ValueError):
    """The file has a known format but its content is damaged or incomplete.

    Attributes:
        path: the file.
        reason: what is wrong with it.
        member: the zip member (or other part) where it was found, if known.
        offset: the byte offset (in the file, or in ``member``), if known.
    """

    def __init__(
        self, path: Path, reason: str, *, member: str | None = None, offset: int | None = None
    ) -> None:
        self.path = path
        self.reason = reason
        self.member = member
        self.offset = offset
        super().__init__(
            f"{path} is damaged: {reason}{_where(member, offset)}. The file cannot be read as it is; "
            "re-create or re-download it (an interrupted copy or save is the usual cause)."
        )


def _where(member: str | None, offset: int | None) -> str:
    parts = []
    if member is not None:
        parts.append(f"member {member!r}")
    if offset is not None:
        parts.append(f"offset {offset}")
    return f" (at {', '.join(parts)})" if parts else ""


class UnsupportedFormatError(UnreadableFileError, ValueError):
    """The file is in a format torchkeep recognises but will not read safely.

    Attributes:
        path: the file.
        detected: what the file is.
        remedy: what to do instead.
    """

    def __init__(self, path: Path, detected: str, remedy: str) -> None:
        self.path = path
        self.detected = detected
        self.remedy = remedy
        super().__init__(
            f"{path} is {detected}, which torchkeep does not read without running code. {remedy}"
        )


class UnknownFormatError(UnsupportedFormatError):
    """The file is not a model file torchkeep knows.

    Attributes:
        path: the file.
        detected: a description of what the file seems to be.
    """

    def __init__(self, path: Path, detected: str) -> None:
        remedy = (
            "torchkeep reads .safetensors files, torch.save files (.pt/.pth/.bin/.ckpt/.tar) and "
            "torch.export programs (.pt2); check that the path points to one of them."
        )
        super().__init__(path, detected, remedy)
        Exception.__init__(self, f"{path} is not a model file (it looks like {detected}). {remedy}")


class LimitExceededError(UnsafeError, ValueError):
    """A file asks for more than the reading limits allow (checked before allocating).

    Attributes:
        path: the file.
        limit: the name of the :class:`~torchkeep.Limits` field.
        value: what the file asks for.
        maximum: the limit in force.

    Example:
        >>> torchkeep.load_weights("huge.pt", limits=torchkeep.Limits(max_bytes=2**41))
    """

    def __init__(self, path: Path, limit: str, value: int, maximum: int, *, what: str = "the file") -> None:
        self.path = path
        self.limit = limit
        self.value = value
        self.maximum = maximum
        super().__init__(
            f"{path}: {what} exceeds the reading limit {limit}={maximum:,} (it asks for {value:,}); "
            "nothing was allocated. If you trust the file and it really is this large, pass "
            f"limits=torchkeep.Limits({limit}={value:,}) (CLI: --raise-limit {limit}={value})."
        )


class UnsupportedSuffixError(UsageError, ValueError):
    """The file name's suffix does not say which format to write.

    Attributes:
        path: the path.
        suffix: its suffix.
        supported: the suffixes that would work.
    """

    def __init__(self, path: Path, supported: Sequence[str], *, what: str = "weights") -> None:
        self.path = path
        self.suffix = path.suffix
        self.supported = tuple(supported)
        shown = repr(self.suffix) if self.suffix else "no suffix"
        super().__init__(
            f"cannot tell which format to write {what} to {path}: {shown} is not one of "
            f"{', '.join(self.supported)}; rename the target to end in one of those "
            f"(e.g. {path.with_suffix(self.supported[0]).name})."
        )


class UnsupportedDtypeError(UnreadableFileError, TypeError):
    """A tensor's dtype cannot be stored in the chosen format.

    Attributes:
        key: the state-dict key of the tensor.
        dtype: its dtype, as text.
    """

    def __init__(self, key: str, dtype: str, *, fmt: str = "safetensors") -> None:
        self.key = key
        self.dtype = dtype
        super().__init__(
            f"tensor {key!r} has dtype {dtype}, which {fmt} cannot store; save to a "
            ".pt file instead, or cast it first (save_weights(..., dtype=torch.float32) "
            "casts floating-point tensors)."
        )


class InvalidMetadataError(UsageError, TypeError):
    """Metadata passed to a save is not a mapping of strings to strings.

    Attributes:
        key: the offending key.
    """

    def __init__(self, key: object, reason: str) -> None:
        self.key = key
        super().__init__(
            f"metadata entry {key!r}: {reason}; metadata must map str to str "
            "(convert numbers with str() and structures with json.dumps())."
        )


class NotAStateDictError(UnreadableFileError, TypeError):
    """The file holds something other than a state dict of tensors.

    Attributes:
        path: the file (``None`` for an in-memory object).
        found: a description of what it holds.
        keys: the top-level keys, when it holds a dict.
    """

    def __init__(self, path: Path | None, found: str, *, keys: Sequence[str] = (), hint: str = "") -> None:
        self.path = path
        self.found = found
        self.keys = tuple(keys)
        where = f"{path} holds" if path is not None else "got"
        if not hint:
            hint = (
                f"pass key=... naming the entry that holds the weights (keys: {_short_list(list(self.keys))})"
                if self.keys
                else "pass a model, a dict of tensors, or a file written by save_weights or "
                "torch.save(model.state_dict())"
            )
        super().__init__(f"{where} {found}, not a state dict (a dict of str to Tensor); {hint}.")


class NotAModelError(UnreadableFileError, TypeError):
    """The file does not hold a whole model.

    Attributes:
        path: the file.
        found: a description of what it holds.
    """

    def __init__(self, path: Path, found: str, *, fix: str = "") -> None:
        self.path = path
        self.found = found
        fix = fix or "build the model in code and load the weights with torchkeep.load_into(model, path)"
        super().__init__(f"{path} holds {found}, not a whole model; {fix}.")


class MissingClassError(UnreadableFileError, ImportError):
    """A trusted pickle names a class or function that cannot be imported here.

    Attributes:
        path: the file, as ``str`` (ImportError's own attribute).
        cause: what the import said.
    """

    def __init__(self, path: Path, cause: BaseException) -> None:
        self.cause = str(cause)
        super().__init__(
            f"{path} was pickled with a class or function that cannot be imported here ({cause}); make "
            "it importable under the module path it was saved from, then re-save the file without pickle "
            "(torchkeep.save_weights or torchkeep.save_model) so this never happens again.",
            path=str(path),
        )


class MissingExtraError(UsageError, ImportError):
    """An optional dependency is not installed.

    Attributes:
        package: the missing package.
        extra: the torchkeep extra that installs it.
    """

    def __init__(self, package: str, extra: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(f"this needs {package}, which is not installed; pip install 'torchkeep[{extra}]'")


class UnknownProtocolError(UsageError, ValueError):
    """A URL whose protocol fsspec does not know (a typo, or a driver it has never heard of).

    Attributes:
        url: the URL.
        protocol: its protocol, e.g. ``"s4"``.
    """

    def __init__(self, url: str, protocol: str) -> None:
        self.url = url
        self.protocol = protocol
        super().__init__(
            f"{url}: fsspec knows no protocol {protocol!r}. Check the spelling (s3://, gs://, az://, "
            "memory://, file://); `python -c 'import fsspec; print(fsspec.available_protocols())'` lists "
            "the known ones."
        )


class WeightsUnavailableError(UnreadableFileError, FileNotFoundError):
    """Pretrained weights are neither in the cache nor downloadable (e.g. offline).

    Attributes:
        url: where they would come from.
        cache_path: where torchkeep looked for them, and where to put them.
    """

    def __init__(self, url: str, cache_path: Path, cause: BaseException) -> None:
        self.url = url
        self.cache_path = cache_path
        super().__init__(
            f"pretrained weights are not cached at {cache_path} and downloading {url} failed ({cause}). "
            f"On a machine with network access, download that URL and copy the file to {cache_path} "
            "(or set TORCH_HOME to a folder holding hub/checkpoints/ with it), or pass weights_path=..."
        )


class UnserializableValueError(UsageError, TypeError):
    """A checkpoint value has a type that a safe loader could not read back.

    Attributes:
        where: where the value sits (e.g. ``extra['config']['cls']``).
        type_name: its type.
    """

    def __init__(self, where: str, type_name: str) -> None:
        self.where = where
        self.type_name = type_name
        super().__init__(
            f"{where} is a {type_name}, which torch.load(weights_only=True) cannot read back; "
            "store plain values instead (None, bool, int, float, str, tensors, and lists, "
            "tuples and dicts of them), e.g. a dataclass as dataclasses.asdict(obj)."
        )


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


class NewerFormatError(CheckpointError, ValueError):
    """A checkpoint was written by a newer torchkeep, in a format this version does not know.

    Attributes:
        path: the checkpoint.
        found: its format version.
        supported: the newest version this torchkeep reads.
    """

    def __init__(self, path: Path, found: object, supported: int) -> None:
        self.path = path
        self.found = found
        self.supported = supported
        super().__init__(
            f"{path} uses checkpoint format version {found}, but this torchkeep reads versions up to "
            f"{supported}; upgrade torchkeep (pip install -U torchkeep) to restore it. Nothing was changed."
        )


class AsyncSaveError(CheckpointError, RuntimeError):
    """A checkpoint written in the background (``async_save=True``) failed.

    Raised by the next call on the :class:`~torchkeep.Checkpointer` (``save``,
    ``wait``, ``restore``, leaving its ``with`` block), so no failure is lost.
    The failed checkpoint was not committed; earlier ones are intact.

    Attributes:
        step: the step whose save failed.
        cause: the original exception (also ``__cause__``).
    """

    def __init__(self, step: int, cause: BaseException) -> None:
        self.step = step
        self.cause = cause
        super().__init__(
            f"the background save of step {step} failed: {first_line(cause)}. That checkpoint was not "
            "committed and the earlier ones are intact; fix the cause (disk space? permissions?) and "
            "save again."
        )


class DistributedSaveError(DistributedError, RuntimeError):
    """A rank of a ``torch.distributed`` job failed during a checkpoint save.

    Raised on every rank, so all of them leave ``save()`` together; the
    checkpoint was not committed and the earlier ones are intact.

    Attributes:
        step: the step whose save failed.
        stage: what the ranks were doing (``"write"``, ``"commit"``).
        failed: ``{rank: "ErrorType: message"}`` for each failed rank.

    Example:
        >>> try:
        ...     ckpts.save(step, model=model, optimizer=opt)
        ... except torchkeep.DistributedSaveError as err:
        ...     print(err.failed)  # {1: "OSError: [Errno 28] No space left on device"}
    """

    def __init__(self, step: int, stage: str, failed: dict[int, str]) -> None:
        self.step = step
        self.stage = stage
        self.failed = dict(failed)
        listed = "; ".join(f"rank {rank}: {text}" for rank, text in sorted(self.failed.items()))
        super().__init__(
            f"the checkpoint of step {step} failed during {stage} on {len(self.failed)} rank(s) ({listed}). "
            "Nothing was committed and the earlier checkpoints are intact; fix the cause on those ranks "
            "and save again."
        )


class NoValidCheckpointError(CheckpointError, FileNotFoundError):
    """A run folder holds checkpoints, but none of them verifies.

    Attributes:
        directory: the run folder.
        reasons: ``{checkpoint folder name: why it is invalid}``.
    """

    def __init__(self, directory: Path | str, reasons: dict[str, str]) -> None:
        self.directory = directory
        self.reasons = dict(reasons)
        listed = "; ".join(f"{name}: {why}" for name, why in list(self.reasons.items())[:5])
        super().__init__(
            f"{directory} holds {len(self.reasons)} checkpoint(s) and none is valid ({listed}). "
            "Nothing was restored or changed. Restore the folder from a backup, or move it away to "
            "start the run from scratch; `torchkeep verify` shows each problem."
        )


class RunLockedError(CheckpointError, BlockingIOError):
    """Another writer holds the run folder: one Checkpointer writes to a run at a time.

    Attributes:
        directory: the run folder (or its URL).
        holder: what the holder recorded about itself (``host``, ``pid``, ``since``).

    Example:
        >>> torchkeep.Checkpointer("runs/exp1")   # while a training process saves there
        RunLockedError: runs/exp1 is being written by pid 4242 on host gpu-7 ...
    """

    def __init__(self, directory: Path | str, holder: dict[str, object]) -> None:
        self.directory = directory
        self.holder = dict(holder)
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        super().__init__(
            f"{directory} is being written by {who} (since {holder.get('since', '?')}); a run has one "
            "writer at a time. Stop that process, or read the run without writing: "
            "Checkpointer(..., read_only=True) or `torchkeep ls`."
        )


class MissingMetricError(CheckpointError, KeyError):
    """The metric to monitor is not among the metrics given.

    Attributes:
        monitor: the metric's name.
        available: the names that were given.
    """

    def __init__(self, monitor: str, available: Sequence[str], *, where: str) -> None:
        self.monitor = monitor
        self.available = list(available)
        super().__init__(
            f"{where} monitors {monitor!r}, but the metrics given are {self.available or 'empty'}; "
            f"pass metrics={{{monitor!r}: value}} or monitor one of the given names"
        )

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


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


class ExportError(UsageError, RuntimeError):
    """``torch.export`` could not capture the model.

    Attributes:
        model_name: the model's class name.
    """

    def __init__(self, model_name: str, cause: BaseException) -> None:
        self.model_name = model_name
        first = first_line(cause)
        super().__init__(
            f"torch.export could not capture {model_name}: {first}. Check that example_inputs "
            "match what forward() takes, pass dynamic_shapes=... for sizes that vary, or save "
            "the weights with save_weights() and rebuild the model in code."
        )


class UnsafeFileError(UnsafeError, pickle.UnpicklingError):
    """Loading the file would import or call code, or it is built to fool readers.

    Attributes:
        path: the file.
        globals: the ``module.name`` objects outside the allowlist that the
            file would import.
        reason: what was refused.
        member: the zip member (e.g. ``archive/data.pkl``), if any.
        offset: the byte offset in that member (or file) where it was found.
        opcode: the pickle opcode refused, if any.
    """

    def __init__(
        self,
        path: Path,
        globals_: Sequence[str] = (),
        *,
        reason: str | None = None,
        member: str | None = None,
        offset: int | None = None,
        opcode: str | None = None,
    ) -> None:
        self.path = path
        self.globals = list(globals_)
        self.member = member
        self.offset = offset
        self.opcode = opcode
        if reason is None:
            names = _short_list(self.globals) if self.globals else "objects outside the safe allowlist"
            reason = f"is a pickle that would import {names} when loaded"
        self.reason = reason
        where = _where(member, offset)
        if opcode is not None:
            where = f"{where[:-1]}, opcode {opcode})" if where else f" (opcode {opcode})"
        if self.globals or opcode is not None:
            advice = (
                "Nothing was unpickled. If you trust where the file came from, pass trust=True; "
                "`torchkeep scan` lists everything it would import. To make a file that needs no trust, "
                "load it once with trust=True and re-save it with "
                "torchkeep.save_weights(model, 'model.safetensors') or "
                "torchkeep.save_model(model, 'model.pt2', example_inputs=...) "
                "(CLI: torchkeep convert --trust IN OUT.safetensors)."
            )
        else:
            advice = (
                "Nothing was unpickled. The file looks crafted to fool model-file scanners: do not "
                "load it with torch.load; `torchkeep scan` shows the details."
            )
        super().__init__(f"{path} {reason}{where}. {advice}")


# The name used before ``scan`` existed; the same class.
UntrustedFileError = UnsafeFileError


class TorchkeepWarning(UserWarning):
    """Base class of torchkeep's warnings."""


class RngRestoreWarning(TorchkeepWarning):
    """A saved random-number-generator state could not be restored (fully).

    Training then goes on with other random numbers than the original run
    would have drawn; the message says which generator and why.
    """


class NonFiniteCheckpointWarning(TorchkeepWarning):
    """A checkpoint was saved with NaN or Inf in its model tensors or its monitored metric.

    It is kept (training may want to inspect it) but flagged in its manifest,
    shown as poisoned by ``torchkeep ls`` / ``verify``, and never ranked best.
    """


class InvalidShardSizeError(UsageError, ValueError):
    """``max_shard_size`` is not a size ``save_weights`` can split by.

    Attributes:
        value: what was passed.

    Example:
        >>> torchkeep.save_weights(model, "out/", max_shard_size="5GB")  # not "5 gigs"
    """

    def __init__(self, value: object, reason: str) -> None:
        self.value = value
        super().__init__(
            f"max_shard_size={value!r} is not a shard size: {reason}; pass a number of bytes or text "
            "like '5GB', '500MB', '50KB' (1000-based, as Hugging Face counts) or '2GiB', '512MiB' "
            "(1024-based)."
        )

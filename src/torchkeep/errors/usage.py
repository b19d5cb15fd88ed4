"""Errors of the group :class:`UsageError`: an argument or environment torchkeep cannot use."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torchkeep.errors._base import UsageError, first_line

__all__ = [
    "CallOrderError",
    "ExportError",
    "InvalidArgumentError",
    "InvalidMetadataError",
    "InvalidShardSizeError",
    "MissingExtraError",
    "SignalHandlerError",
    "UnknownProtocolError",
    "UnserializableValueError",
    "UnsupportedSuffixError",
]


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


class InvalidArgumentError(UsageError, ValueError):
    """An argument has a value torchkeep cannot use (out of range, the wrong kind, empty).

    Attributes:
        argument: the argument's name, e.g. ``"decay"``.
        value: what was passed.

    Example:
        >>> torchkeep.EMA(model, decay=0.999)  # not decay=999 or decay=1.0
    """

    def __init__(self, argument: str, value: object, reason: str, fix: str) -> None:
        self.argument = argument
        self.value = value
        super().__init__(f"{argument}={value!r} {reason}; {fix}.")


class CallOrderError(UsageError, RuntimeError):
    """A method was called where it cannot do what it says (inside a block that forbids it).

    Attributes:
        call: the call refused, e.g. ``"EMA.update()"``.

    Example:
        >>> with ema.applied(model):
        ...     evaluate(model)
        >>> ema.update()  # after the block, not inside it
    """

    def __init__(self, call: str, reason: str, fix: str) -> None:
        self.call = call
        super().__init__(f"{call} {reason}; {fix}.")


class SignalHandlerError(UsageError, ValueError):
    """``Checkpointer(..., preemption=...)`` cannot handle the signals asked for.

    Raised for a name that is no signal of this platform, a signal no process
    can catch (``SIGKILL``, ``SIGSTOP``), or a Checkpointer built outside the
    main thread (Python runs signal handlers in the main thread only).

    Attributes:
        signal_name: the signal (as given, or its name).
        reason: why it cannot be handled.

    Example:
        >>> torchkeep.Checkpointer("runs/exp1", preemption=("SIGTERM", "SIGUSR1"))
    """

    def __init__(self, signal_name: str, reason: str, fix: str) -> None:
        self.signal_name = signal_name
        self.reason = reason
        super().__init__(f"cannot save on preemption by {signal_name}: {reason}; {fix}.")


class OutputExistsError(UsageError, FileExistsError):
    """The file or folder to write exists, and writing would replace it.

    Attributes:
        path: the existing path (a URL for a remote one).

    Example:
        >>> torchkeep.export_step("runs/exp1/step-00000120", "archive/step-00000120", overwrite=True)
    """

    def __init__(self, path: Path | str) -> None:
        self.path = path
        super().__init__(
            f"{path} exists; choose another name, or pass overwrite=True (--force) to replace it."
        )

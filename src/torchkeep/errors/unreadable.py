"""Errors of the group :class:`UnreadableFileError`: the file cannot be used as asked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torchkeep.errors._base import UnreadableFileError, _short_list, _where

__all__ = [
    "CorruptFileError",
    "MissingClassError",
    "ModelFileNotFoundError",
    "NotAModelError",
    "NotAStateDictError",
    "PathIsDirectoryError",
    "UnknownFormatError",
    "UnsupportedDtypeError",
    "UnsupportedFormatError",
    "WeightsUnavailableError",
]


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

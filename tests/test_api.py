"""The public surface: complete, sorted, typed errors that subclass the builtins."""

from __future__ import annotations

import inspect
import pickle
import types

import pytest

import torchkeep
from torchkeep import errors


def test_all_is_sorted_and_complete() -> None:
    assert torchkeep.__all__ == sorted(torchkeep.__all__, key=_isort_key)  # ruff's RUF022 order
    public = {
        name
        for name, value in vars(torchkeep).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(torchkeep.__all__) - {"__version__"}
    for name in torchkeep.__all__:
        assert hasattr(torchkeep, name), name


def _isort_key(name: str) -> tuple[int, str]:
    """ruff's RUF022 order: CONSTANTS, then CamelCase, then the rest."""
    if name.isupper() and len(name) > 1:
        return (0, name)
    return (1, name) if name[:1].isupper() else (2, name)


def test_every_module_declares_a_sorted_all() -> None:
    import pkgutil

    for info in pkgutil.walk_packages(torchkeep.__path__, "torchkeep."):
        if info.name.endswith("__main__"):
            continue
        module = __import__(info.name, fromlist=["_"])
        assert hasattr(module, "__all__"), info.name
        assert list(module.__all__) == sorted(module.__all__, key=_isort_key), info.name


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (errors.ModelFileNotFoundError, FileNotFoundError),
        (errors.PathIsDirectoryError, IsADirectoryError),
        (errors.CorruptFileError, ValueError),
        (errors.UnknownFormatError, errors.UnsupportedFormatError),
        (errors.UnsupportedSuffixError, ValueError),
        (errors.UnsupportedDtypeError, TypeError),
        (errors.InvalidMetadataError, TypeError),
        (errors.NotAStateDictError, TypeError),
        (errors.NotAModelError, TypeError),
        (errors.UnserializableValueError, TypeError),
        (errors.MissingClassError, ImportError),
        (errors.KeyMismatchError, RuntimeError),
        (errors.CheckpointMismatchError, ValueError),
        (errors.BaseMismatchError, ValueError),
        (errors.ExportError, RuntimeError),
        (errors.OutputExistsError, FileExistsError),
        (errors.UntrustedFileError, pickle.UnpicklingError),
        (errors.UnsafeFileError, pickle.UnpicklingError),
        (errors.LimitExceededError, ValueError),
        (errors.UnsupportedFormatError, ValueError),
    ],
)
def test_errors_subclass_the_base_and_the_builtin(error: type, builtin: type) -> None:
    assert issubclass(error, torchkeep.TorchkeepError)
    assert issubclass(error, builtin)
    assert error.__doc__


def test_every_error_class_is_listed_in_the_module_tree() -> None:
    for name, value in vars(errors).items():
        if inspect.isclass(value) and issubclass(
            value, torchkeep.TorchkeepError | torchkeep.TorchkeepWarning
        ):
            assert name in (errors.__doc__ or ""), name
            assert name in torchkeep.__all__, name


def test_public_functions_have_documented_arguments() -> None:
    for name in torchkeep.__all__:
        value = getattr(torchkeep, name)
        if inspect.isfunction(value):
            doc = inspect.getdoc(value) or ""
            assert "Example" in doc, name
            for param in inspect.signature(value).parameters:
                assert param in doc, f"{name}: {param} is not documented"


def test_options_are_keyword_only() -> None:
    for name in (
        "save_weights",
        "load_weights",
        "load_into",
        "save_model",
        "load_model",
        "save_checkpoint",
        "load_checkpoint",
    ):
        params = list(inspect.signature(getattr(torchkeep, name)).parameters.values())
        positional = [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        assert len(positional) <= 2, (name, positional)

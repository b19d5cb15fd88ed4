"""Whole models: a portable ``torch.export`` program, and legacy pickles on trust.

``torch.save(model)`` pickles a reference to the model's class, so the file
only loads where that class is importable under the same module path, and
loading it runs code from the file. ``save_model`` writes a ``.pt2`` program
instead: the computation graph and the weights, loadable with torch alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkeep.errors import CorruptFileError, ExportError, NotAModelError, UnsafeFileError
from torchkeep.formats import FileFormat, detect_format, read_safetensors_header, suffix_format
from torchkeep.modes import evaluating
from torchkeep.safety import scan
from torchkeep.storage import atomic_target
from torchkeep.weights import MapLocation, read_torch_file

__all__ = ["load_exported", "load_model", "save_model"]

logger = logging.getLogger(__name__)

_MODEL_SUFFIXES = {".pt2": FileFormat.TORCH_EXPORT}


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    example_inputs: tuple[Any, ...] | torch.Tensor,
    dynamic_shapes: Mapping[str, Any] | tuple[Any, ...] | list[Any] | None = None,
    durable: bool = True,
) -> Path:
    """Save architecture and weights as a portable ``torch.export`` program (``.pt2``).

    The model is captured in eval mode (Dropout off, BatchNorm on running
    statistics), the mode a saved model is used in; its own training flags
    are left as they were. The file loads with :func:`load_model` (or
    ``torch.export.load``) in a process that cannot import the model's class.

    Args:
        model (nn.Module): the model to save.
        path (str | PathLike): the file to write; must end in ``.pt2``.
        example_inputs (tuple | Tensor): arguments for one call of ``forward``.
        dynamic_shapes (dict | tuple | list | None, default None): which input
            sizes may vary, as ``torch.export.export`` takes them, e.g.
            ``{"x": {0: torch.export.Dim("batch")}}``. Without it the program
            accepts exactly the example's shapes.
        durable (bool, default True): fsync before the file replaces ``path``.

    Returns:
        The path written.

    Raises:
        UnsupportedSuffixError: ``path`` does not end in ``.pt2``.
        ExportError: ``torch.export`` cannot capture the model.

    Example:
        >>> torchkeep.save_model(model, "model.pt2", example_inputs=(torch.randn(1, 3, 26, 26),))
    """
    target = Path(path)
    suffix_format(target, _MODEL_SUFFIXES, what="a whole model")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with evaluating(model, inference=False):
        try:
            program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
        except Exception as err:  # torch.export raises many types; all mean "cannot capture"
            raise ExportError(type(model).__name__, err) from err
    with atomic_target(target, durable=durable) as tmp:
        torch.export.save(program, tmp)
    logger.info("saved %s as a torch.export program to %s", type(model).__name__, target)
    return target


def load_exported(path: Path) -> torch.export.ExportedProgram:
    """Read a ``.pt2`` program, with damage reported as :class:`CorruptFileError`.

    The archive and the pickles inside it (sample inputs) are scanned first
    with torchkeep's own reader, so ``torch.export.load`` only ever sees a
    file that holds nothing but tensors and plain values.

    Raises:
        UnsafeFileError: the archive imports or calls something outside the allowlist.
        CorruptFileError: the archive is damaged.
    """
    verdict = scan(path)
    if verdict.verdict == "UNSAFE":
        names = [f.detail for f in verdict.findings if f.kind == "import"]
        raise UnsafeFileError(path, names, reason=None if names else f"is unsafe: {verdict.reason}")
    if verdict.verdict != "SAFE":
        raise CorruptFileError(path, verdict.reason)
    try:
        return torch.export.load(path)
    except Exception as err:  # a damaged archive fails in many ways inside torch
        raise CorruptFileError(path, f"the torch.export program cannot be read ({err})") from err


def _set_eval_flags(module: nn.Module) -> nn.Module:
    # Exported graphs refuse .eval(); their mode was fixed at export, so only the flags change.
    for sub in module.modules():
        sub.training = False
    return module


def load_model(
    path: str | os.PathLike[str],
    *,
    trust: bool = False,
    map_location: MapLocation = "cpu",
) -> nn.Module:
    """Load a whole model, ready for inference (eval mode).

    Reads ``.pt2`` programs written by :func:`save_model` / ``torch.export.save``
    with no pickle involved. Reads a legacy pickled model
    (``torch.save(model, path)``) only with ``trust=True``, since unpickling it
    imports and runs code named in the file; its class must be importable.

    Args:
        path (str | PathLike): the file.
        trust (bool, default False): allow unpickling arbitrary objects from a
            ``torch.save`` file. Only for files from a source you trust.
        map_location (str | torch.device, default "cpu"): where the tensors
            of a pickled model go.

    Returns:
        An ``nn.Module`` in eval mode.

    Raises:
        UnsafeFileError: a pickled model and ``trust`` is False; the error
            lists the classes and functions the file would import.
        NotAModelError: the file holds weights or a checkpoint, not a model.
        CorruptFileError, UnknownFormatError, ModelFileNotFoundError: as for
            :func:`load_weights`.

    Example:
        >>> model = torchkeep.load_model("model.pt2")
        >>> with torchkeep.evaluating(model):
        ...     y = model(x)
    """
    p = Path(path)
    fmt = detect_format(p)
    if fmt is FileFormat.TORCH_EXPORT:
        return _set_eval_flags(load_exported(p).module())
    if fmt is FileFormat.SAFETENSORS:
        read_safetensors_header(p)  # a damaged file is called damaged, not merely "not a model"
        raise NotAModelError(p, "weights (safetensors)")
    if not trust:
        obj = read_torch_file(p, map_location=map_location)  # raises UnsafeFileError for a pickled model
        raise NotAModelError(
            p, "plain data (weights or a checkpoint)" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        )
    obj = read_torch_file(p, map_location=map_location, trust=True)
    if not isinstance(obj, nn.Module):
        raise NotAModelError(p, f"a pickled {type(obj).__name__}")
    return obj.eval()

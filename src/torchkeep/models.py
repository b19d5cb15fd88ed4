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

from torchkeep.errors import CorruptFileError, ExportError, NotAModelError
from torchkeep.formats import FileFormat, detect_format, read_safetensors_header, suffix_format
from torchkeep.modes import evaluating
from torchkeep.safety.limits import DEFAULT_LIMITS, Limits
from torchkeep.safety.pt2 import load_vetted, vet_pt2
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


def load_exported(
    path: Path, *, trust: bool = False, limits: Limits = DEFAULT_LIMITS
) -> torch.export.ExportedProgram:
    """Read a ``.pt2`` program, vetted completely by torchkeep before torch sees it.

    Every member, JSON field, call target and symbolic expression is checked
    (:func:`torchkeep.safety.pt2.vet_pt2`), and ``torch.export.load`` then
    reads a rebuilt archive of the checked parts only, so nothing in the file
    is unpickled, evaluated, compiled or loaded as native code.

    Args:
        path (Path): the archive.
        trust (bool, default False): skip the vetting and hand the file to
            ``torch.export.load`` as it is (which may run code from it). Only
            for files from a source you trust that use constructs torchkeep
            refuses (AOTInductor code, pickled tensor subclasses, custom ops).
        limits (Limits): bounds checked before anything is allocated.

    Raises:
        UnsafeFileError: the archive holds something torch would unpickle,
            evaluate or run, or a call outside the allowlist; the message names
            the construct and the member.
        CorruptFileError: the archive is damaged.
        LimitExceededError: it asks for more than ``limits`` allow.
    """
    if not trust:
        return load_vetted(vet_pt2(path, limits=limits), limits=limits)
    logger.warning("loading %s with trust=True: torch.export.load may run code from it", path)
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
            ``torch.save`` file, and skip the vetting of a ``.pt2`` (see
            :func:`load_exported`). Only for files from a source you trust.
        map_location (str | torch.device, default "cpu"): where the tensors
            of a pickled model go.

    Returns:
        An ``nn.Module`` in eval mode.

    Raises:
        UnsafeFileError: a pickled model, or a ``.pt2`` with a construct
            torchkeep refuses, and ``trust`` is False; the error names what
            the file would import or run, and where.
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
        return _set_eval_flags(load_exported(p, trust=trust).module())
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

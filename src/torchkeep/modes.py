"""Inference mode done right: eval flags on every submodule, restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

__all__ = ["evaluating"]

M = TypeVar("M", bound=nn.Module)


@contextmanager
def evaluating(model: M, *, inference: bool = True) -> Iterator[M]:
    """Run a block with ``model`` in eval mode and without autograd.

    Every submodule is put in eval mode (Dropout off, BatchNorm on its running
    statistics) and the block runs under ``torch.inference_mode()``. On exit,
    also when the block raises, each submodule gets back its own previous
    training flag: a model that was half frozen stays half frozen.

    Args:
        model (nn.Module): the model.
        inference (bool, default True): use ``torch.inference_mode()``; pass
            False to keep autograd (e.g. for gradients w.r.t. the input).

    Yields:
        The model itself.

    Example:
        >>> with torchkeep.evaluating(model):
        ...     predictions = model(batch).argmax(1)
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
    except NotImplementedError:  # exported graphs refuse .eval(); their flags can still be set
        for module, _ in flags:
            module.training = False
    try:
        if inference:
            with torch.inference_mode():
                yield model
        else:
            yield model
    finally:
        for module, flag in flags:
            module.training = flag

"""Recognising the checkpoints other libraries write: the one place that knows their layouts.

:func:`read_checkpoint` turns a file or folder into a :class:`Saved`: the
model, optimizer, scheduler, scaler and RNG states under torchkeep's names,
plus progress, metrics and hyper-parameters. Single-file layouts are in
:mod:`~torchkeep.layouts.files` (one table), folders in
:mod:`~torchkeep.layouts.folders`; :mod:`~torchkeep.layouts.optimizers`
checks a saved optimizer state against an optimizer, and
:mod:`~torchkeep.layouts.rngstate` reads other libraries' RNG states.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

from torchkeep.errors import NotAStateDictError
from torchkeep.layouts.files import LAYOUTS, placeholder_keys, read_dict
from torchkeep.layouts.folders import folder_layout, read_folder
from torchkeep.layouts.saved import HYPER_PARAMETER_KEYS, Reading, Saved, allow_placeholders, read_file

__all__ = ["HYPER_PARAMETER_KEYS", "LAYOUTS", "Reading", "Saved", "read_checkpoint"]


def read_checkpoint(path: Path, reading: Reading, wanted: Collection[str]) -> Saved:
    """The parts of the checkpoint at ``path`` (a file or a folder), whatever wrote it.

    Args:
        wanted: the parts the caller will restore (folders read only those files).

    Raises:
        NotAStateDictError: not a checkpoint (nor a state dict), or an entry of the wrong type.
        UnsafeFileError, LimitExceededError, CorruptFileError: as for :func:`torchkeep.load_weights`.
    """
    if path.is_dir():
        layout = folder_layout(path)
        if layout is None:
            raise NotAStateDictError(
                path,
                "a folder with no checkpoint files",
                hint="pass a checkpoint file, an HF Trainer checkpoint-N/ folder (trainer_state.json), "
                "an accelerate save_state() folder, or a folder of model weights (model.safetensors)",
            )
        return read_folder(path, layout, reading, wanted)
    content = read_file(path, reading)
    if not isinstance(content, Mapping):
        allow_placeholders(path, content, Saved("weights"), reading, allowed=frozenset())
        raise NotAStateDictError(
            path, f"a {type(content).__name__}", hint="pass a checkpoint file written by save_checkpoint"
        )
    layout = next(name for name, matches, _ in LAYOUTS if matches(content))
    saved = Saved(layout)
    content = allow_placeholders(path, content, saved, reading, allowed=placeholder_keys(layout))
    found = read_dict(path, content)
    found.placeholders = saved.placeholders
    return found

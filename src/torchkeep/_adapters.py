"""PEFT adapter files: recognising them and naming their tensors the way the model does.

An adapter file (``adapter_model.safetensors``, written by PEFT's
``save_pretrained``) holds only the adapter's tensors, under the model's names
with the adapter's name left out: the model's
``...q_proj.lora_A.default.weight`` is the file's ``...q_proj.lora_A.weight``,
and a ``modules_to_save`` copy ``...classifier.modules_to_save.default.weight``
is the file's ``...classifier.weight``. The name is left out so that one file
can be loaded as any adapter; here it is put back from the model's side, so
no knowledge of each PEFT method is needed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from torchkeep.errors import ModelFileNotFoundError
from torchkeep.storage.remote import is_url

__all__ = ["ADAPTER_CONFIG", "AdapterSource", "adapter_file_keys", "find_adapter"]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
# what PEFT's save_pretrained writes, safetensors first (its default)
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_CONFIG_MAX_BYTES = 1 << 20
# PEFT keeps a copy of each module in modules_to_save under this segment, then the adapter name
_MODULES_TO_SAVE = "modules_to_save"


@dataclass(frozen=True)
class AdapterSource:
    """A PEFT adapter found on disk.

    Attributes:
        weights: the adapter's tensor file.
        peft_type: ``peft_type`` from ``adapter_config.json`` (e.g. ``"LORA"``), or ``""``.
    """

    weights: Path
    peft_type: str


def _peft_type(config: Path) -> str:
    try:
        if config.stat().st_size > _CONFIG_MAX_BYTES:
            return ""
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # the config is a hint only; the tensors decide what loads
        logger.info("%s: unreadable, treated as a PEFT adapter config anyway", config)
        return ""
    value = data.get("peft_type", "") if isinstance(data, dict) else ""
    return value if isinstance(value, str) else ""


def find_adapter(path: str | os.PathLike[str]) -> AdapterSource | None:
    """The PEFT adapter at ``path``: a folder with ``adapter_config.json``, or a file beside one.

    Args:
        path (str | PathLike): a weights file or a folder (URLs are never adapters here).

    Returns:
        The adapter, or None when ``path`` is not one.

    Raises:
        ModelFileNotFoundError: ``path`` is an adapter folder without an adapter file in it.
    """
    if is_url(os.fspath(path)):
        return None
    location = Path(path)
    if location.is_dir():
        config = location / ADAPTER_CONFIG
        if not config.is_file():
            return None
        for name in _ADAPTER_FILES:
            if (location / name).is_file():
                return AdapterSource(location / name, _peft_type(config))
        raise ModelFileNotFoundError(location / _ADAPTER_FILES[0])
    config = location.parent / ADAPTER_CONFIG
    if location.is_file() and config.is_file():
        return AdapterSource(location, _peft_type(config))
    return None


def adapter_file_keys(model_keys: list[str], adapter_name: str) -> dict[str, str]:
    """``file key -> model key`` for the model's tensors of one adapter, named as adapter files name them.

    Args:
        model_keys (list[str]): the model's state-dict keys.
        adapter_name (str): the adapter, e.g. ``"default"``.

    Returns:
        One entry per model key that holds ``adapter_name`` as a whole segment.
    """
    found: dict[str, str] = {}
    for key in model_keys:
        parts = key.split(".")
        if adapter_name not in parts:
            continue
        at = parts.index(adapter_name)
        start = at - 1 if at > 0 and parts[at - 1] == _MODULES_TO_SAVE else at
        found[".".join(parts[:start] + parts[at + 1 :])] = key
    return found

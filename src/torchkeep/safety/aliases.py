"""The ``torchkeep.aliases`` record: tied weights stored once, checked so metadata cannot change values.

``save_weights`` stores tied tensors (``out.weight is embed.weight``) once and
writes ``{"alias": "stored key"}`` into the safetensors metadata. A hostile
file can name a stored key as an alias and have the loader return another
tensor's values under it; :func:`check_aliases` accepts only aliases that
add a key the file does not store and point at one it does. The loaders
and ``scan`` both call it, so they give the same answer.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path

from torchkeep.errors import CorruptFileError, first_line

__all__ = ["ALIASES_KEY", "check_aliases"]

ALIASES_KEY = "torchkeep.aliases"


def check_aliases(path: Path, stored: Collection[str], metadata: Mapping[str, object]) -> dict[str, str]:
    """The ``alias -> stored key`` map of ``metadata`` (empty without a record), checked.

    Args:
        path: the file, for messages.
        stored: the keys the file stores.
        metadata: its text metadata.

    Raises:
        CorruptFileError: the record is not a JSON object of str to str, or an
            alias is itself stored, or it points at a key the file does not
            store (chains included).
    """
    if ALIASES_KEY not in metadata:
        return {}
    raw = metadata[ALIASES_KEY]
    what = f"the tied-weights record {ALIASES_KEY!r}"
    if not isinstance(raw, str):
        raise CorruptFileError(path, f"{what} is not a string")
    try:
        aliases = json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, int digit limits, deep nesting
        raise CorruptFileError(
            path, f"{what} is not valid JSON ({type(err).__name__}: {first_line(err)[:80]})"
        ) from None
    if not isinstance(aliases, dict):
        raise CorruptFileError(path, f"{what} is a JSON {type(aliases).__name__}, not an object")
    for alias, canonical in aliases.items():
        if not isinstance(canonical, str):
            raise CorruptFileError(
                path, f"tied weight {alias!r} names a {type(canonical).__name__}, not a key"
            )
        if alias in stored:
            raise CorruptFileError(
                path,
                f"tied weight {alias!r} is also stored in the file: {what} would replace its values "
                f"with {canonical!r}'s",
            )
        if canonical not in stored:
            raise CorruptFileError(
                path, f"tied weight {alias!r} points to {canonical!r}, which the file does not store"
            )
    return aliases

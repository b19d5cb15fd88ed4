"""The members of a ``.pt2`` archive: the exact layout ``torch.export.save`` writes (torch 2.14).

::

    <root>/archive_format                       "pt2"
    <root>/archive_version                      "0"
    <root>/byteorder                            "little"
    <root>/.data/version, .data/serialization_id  digits
    <root>/models/model.json                    the program (.schema, .graph, .symexpr)
    <root>/data/weights/model_weights_config.json, data/weights/weight_<N>     raw bytes
    <root>/data/constants/model_constants_config.json, data/constants/tensor_<N>  raw bytes
    <root>/data/sample_inputs/model.pt          a torch.save file (allowlist unpickler)
    <root>/extra/<name>                         UTF-8 text

Every member is *stored*, as ``torch.export.save`` writes them: a compressed
one would be inflated in memory (up to ``max_compression_ratio`` times its
size in the file) and is refused, so what a load holds is bounded by the
file's size. Anything else (AOTInductor ``.so`` / sources / compile flags,
``opaque_obj_*`` / ``custom_obj_*`` objects, legacy pickled weights, unknown
members) is refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torchkeep.errors import CorruptFileError, LimitExceededError
from torchkeep.safety.limits import Limits

__all__ = [
    "CONSTANT",
    "CONSTANTS_CONFIG",
    "FIXED",
    "ITEMSIZE",
    "MODEL",
    "PROGRAM",
    "ROOT",
    "SAMPLE_INPUTS",
    "WEIGHT",
    "WEIGHTS_CONFIG",
    "DuplicateKey",
    "check_record",
    "classify",
    "max_depth",
    "unique_keys",
]

MODEL = "model"  # the only program name torch.export.load returns
ROOT = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
WEIGHT = re.compile(r"weight_[0-9]{1,9}")
CONSTANT = re.compile(r"tensor_[0-9]{1,9}")
_EXTRA = re.compile(r"extra/[A-Za-z0-9_.\-]{1,128}")
# element sizes of the schema's ScalarType values (torch/_export/serde/schema.py)
ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2}
ITEMSIZE |= {28: 2, 29: 1, 30: 1, 31: 1, 32: 1, 33: 1, 34: 4, 35: 8}
FIXED = {"archive_format": b"pt2", "archive_version": b"0", "byteorder": b"little"}
WEIGHTS_CONFIG = f"data/weights/{MODEL}_weights_config.json"
CONSTANTS_CONFIG = f"data/constants/{MODEL}_constants_config.json"
PROGRAM = f"models/{MODEL}.json"
SAMPLE_INPUTS = f"data/sample_inputs/{MODEL}.pt"
_NATIVE = (".so", ".dll", ".dylib", ".pyd")
_SOURCES = (".cpp", ".c", ".h", ".cu", ".py")


def classify(name: str, *, stored: bool) -> tuple[str, tuple[str, str] | None]:
    """The kind of member ``name`` (relative to the root), and (kind, detail) when it is refused."""
    base = name.rsplit("/", 1)[-1]
    if name.startswith("data/aotinductor/") or base.endswith(_NATIVE):
        return "refused", (
            "native code",
            f"holds AOTInductor / native code {name!r} (loading it runs machine code)",
        )
    if base.endswith(_SOURCES) or "compile_flags" in base or "linker_flags" in base:
        return "refused", (
            "native code",
            f"holds source or build flags {name!r} (torch would compile and load them)",
        )
    if name.startswith(("data/executorch/", "data/mtia", "xl_model_weights/")):
        return "refused", ("member", f"holds {name!r}, a backend package torchkeep does not load")
    if name.startswith("data/constants/") and base.startswith(("opaque_obj_", "custom_obj_")):
        return "refused", (
            "pickle",
            f"holds the Python / torchbind object {name!r} (torch unpickles it with pickle.loads or "
            "torch's object loader)",
        )
    if name in {f"data/weights/{MODEL}.pt", f"data/constants/{MODEL}.pt"}:
        return "refused", (
            "pickle",
            f"holds legacy pickled tensors {name!r} (torch.load(weights_only=False))",
        )
    if not stored:
        return "refused", (
            "member",
            f"stores {name!r} compressed; torch.export.save stores every member as it is, and a "
            "compressed one would be inflated in memory, up to 100 times its size in the file "
            "(re-save the program with torch.export.save)",
        )
    return _kind(name, base), None


def _kind(name: str, base: str) -> str:
    if name in FIXED or name in {".data/version", ".data/serialization_id"}:
        return "fixed"
    if name in {PROGRAM, WEIGHTS_CONFIG, CONSTANTS_CONFIG}:
        return "json"
    if name == SAMPLE_INPUTS:
        return "sample"
    if name.startswith("data/weights/") and WEIGHT.fullmatch(base) and name.count("/") == 2:
        return "weight"
    if name.startswith("data/constants/") and CONSTANT.fullmatch(base) and name.count("/") == 2:
        return "constant"
    if _EXTRA.fullmatch(name):
        return "extra"
    return "second program" if name.startswith("models/") else "unknown"


class DuplicateKey(ValueError):
    """A JSON object holds one key twice (``key`` says which)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook``: raise :class:`DuplicateKey` on a repeated key."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def max_depth(text: str) -> int:
    """How deeply brackets nest in a JSON text (outside strings), without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def check_record(
    path: Path,
    where: str,
    member: str,
    full: str,
    meta: dict[str, Any],
    record: int,
    seen: dict[str, tuple[int, Any]],
    limits: Limits,
) -> bool:
    """Check a schema-checked tensor_meta against its record of ``record`` bytes; False if symbolic.

    Raises:
        CorruptFileError: the shape does not fit the record, or the record is shared inconsistently.
        LimitExceededError: more than ``limits.max_numel`` elements.
    """
    ints = [meta["storage_offset"], *meta["sizes"], *meta["strides"]]
    if not all(isinstance(v, dict) and set(v) == {"as_int"} for v in ints):
        return False
    offset = meta["storage_offset"]["as_int"]
    sizes = [v["as_int"] for v in meta["sizes"]]
    strides = [v["as_int"] for v in meta["strides"]]
    dtype = meta["dtype"]
    key = (dtype, meta["device"].get("type"))
    if seen.setdefault(member, (dtype, key))[1] != key:
        raise CorruptFileError(
            path, f"{where}: {member!r} is shared with a tensor of another dtype or device", member=full
        )
    if len(sizes) != len(strides) or offset < 0 or any(s < 0 for s in sizes) or any(s < 0 for s in strides):
        raise CorruptFileError(
            path, f"{where} has an invalid shape {sizes[:8]} / strides {strides[:8]}", member=full
        )
    numel = 0 if 0 in sizes else 1
    for s in sizes if numel else ():
        numel *= s
        if numel > limits.max_numel:  # stop early: a long list of large sizes would multiply for minutes
            raise LimitExceededError(path, "max_numel", numel, limits.max_numel, what=where)
    itemsize = ITEMSIZE[dtype]
    if record % itemsize:
        raise CorruptFileError(
            path,
            f"{member!r} holds {record} bytes, not a whole number of {itemsize}-byte elements",
            member=full,
        )
    if numel and record:
        needed = (offset + sum((n - 1) * st for n, st in zip(sizes, strides, strict=True)) + 1) * itemsize
        if needed > record:
            raise CorruptFileError(
                path,
                f"{where} declares {sizes} (strides {strides}, offset {offset}), "
                f"which needs {needed} bytes, but {member!r} holds {record}",
                member=full,
            )
    elif numel and not record:
        raise CorruptFileError(path, f"{where} declares data but {member!r} is empty", member=full)
    return True

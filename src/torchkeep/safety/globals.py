"""List the Python objects a pickle would import, without unpickling it.

``pickletools.genops`` only parses opcodes; nothing in the file is imported or
called. The list is what an error message shows before the user decides
whether to trust a file.
"""

from __future__ import annotations

import io
import os
import pickletools
import zipfile
from pathlib import Path
from typing import BinaryIO

__all__ = ["imported_names"]

# What every torch.save file imports to rebuild plain tensors and containers.
_BENIGN_PREFIXES = (
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_qtensor",
)
_BENIGN_NAMES = {
    "torch.serialization._get_layout",
    "collections.OrderedDict",
    "builtins.set",
    "__builtin__.set",
}
_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}
_GET_OPS = {"BINGET", "LONG_BINGET", "GET"}
_PUT_OPS = {"BINPUT", "LONG_BINPUT", "PUT"}
_MAX_PICKLES = 4  # the legacy format is four pickles in a row, then raw storage data


def _is_benign(name: str) -> bool:
    if name in _BENIGN_NAMES or name.startswith(_BENIGN_PREFIXES):
        return True
    module, _, attr = name.rpartition(".")
    # storage classes (torch.FloatStorage, …) and dtypes (torch.float32, …) are data, not code
    return module == "torch" and (
        attr.endswith("Storage") or attr in _DTYPE_NAMES or attr in {"device", "Size"}
    )


_DTYPE_NAMES = {
    "float16",
    "float32",
    "float64",
    "bfloat16",
    "half",
    "float",
    "double",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
}


def _scan(stream: BinaryIO, found: list[str]) -> None:
    recent: list[str | None] = []
    memo: dict[int, str | None] = {}
    for opcode, arg, _pos in pickletools.genops(stream):
        name = opcode.name
        if name == "GLOBAL" and isinstance(arg, str):
            found.append(arg.replace(" ", "."))
            recent.append(None)
        elif name == "STACK_GLOBAL":
            module, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
            found.append(f"{module}.{attr}" if module and attr else "<computed name>")
            recent.append(None)
        elif name in _STRING_OPS:
            recent.append(arg if isinstance(arg, str) else None)
        elif name in _GET_OPS and isinstance(arg, int):
            recent.append(memo.get(arg))
        elif name in _PUT_OPS and isinstance(arg, int):
            memo[arg] = recent[-1] if recent else None
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        else:
            recent.append(None)
        del recent[:-4]


def _scan_all(stream: BinaryIO, found: list[str]) -> None:
    end = stream.seek(0, io.SEEK_END)
    stream.seek(0)
    for _ in range(_MAX_PICKLES):
        try:
            _scan(stream, found)
        except (ValueError, EOFError, IndexError):  # damaged or not a pickle: stop here
            return
        if stream.tell() >= end:
            return


def imported_names(path: str | os.PathLike[str], *, include_benign: bool = False) -> list[str]:
    """The ``module.name`` objects a ``torch.save`` file would import when unpickled.

    Args:
        path (str | PathLike): a ``torch.save`` file, zip or legacy format.
        include_benign (bool, default False): also list what every tensor file imports.

    Returns:
        The names in first-seen order, without repeats. Parsing stops quietly at
        damaged bytes: the list then holds what came before them.
    """
    p = Path(path)
    found: list[str] = []
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as archive:
            for entry in archive.namelist():
                if entry.endswith("data.pkl"):
                    _scan_all(io.BytesIO(archive.read(entry)), found)
    else:
        with p.open("rb") as f:
            _scan_all(f, found)
    unique = list(dict.fromkeys(found))
    return unique if include_benign else [n for n in unique if not _is_benign(n)]

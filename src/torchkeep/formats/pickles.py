"""Pickles: the legacy ``torch.save`` format, raw pickles, and a probe for files that are pickles too.

Reading a pickle is the allowlist interpreter's job (:mod:`torchkeep.safety`);
this module only says whether bytes are one. :func:`runs_as_pickle` answers
the question that matters for a file another format claims: would a real
unpickler (``torch.load``, ``pickle.load``) import or call something before
it gave up on these bytes? It walks the opcodes with :mod:`pickletools`,
which decodes them without executing any.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import pickletools
import re
from collections.abc import Iterator
from typing import IO, BinaryIO, cast

from torchkeep.safety.legacy import LEGACY_PREFIX

__all__ = ["LEGACY_PREFIX", "is_legacy", "looks_like_pickle", "runs_as_pickle"]

# Opcodes through which a real unpickler imports or calls (or hands a value to code that may).
_ACTING = {
    "GLOBAL",
    "STACK_GLOBAL",
    "INST",
    "OBJ",
    "NEWOBJ",
    "NEWOBJ_EX",
    "REDUCE",
    "BUILD",
    "EXT1",
    "EXT2",
    "EXT4",
    "PERSID",
    "BINPERSID",
}
_DOTTED = re.compile(r"[A-Za-z_][\w.]*")


def looks_like_pickle(head: bytes) -> bool:
    """The first bytes are a pickle's PROTO opcode (protocol 2 to 5, what torch and pickle write)."""
    return len(head) > 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def is_legacy(head: bytes) -> bool:
    """The file starts with the pickled magic number of the legacy ``torch.save`` format."""
    return head.startswith(LEGACY_PREFIX)


def runs_as_pickle(f: BinaryIO) -> str | None:
    """What a real unpickler would do with these bytes before stopping, if it would act at all.

    Returns:
        ``None`` when the bytes are not a pickle that gets anywhere (the
        opcodes break before any import or call, and before STOP);
        otherwise a description: the first import or call, or "a complete
        pickle" when the stream reaches STOP.
    """
    with _stream(f) as stream:
        return _first_action(stream)


def _first_action(stream: BinaryIO | mmap.mmap) -> str | None:
    try:
        for opcode, arg, _pos in pickletools.genops(cast(IO[bytes], stream)):
            if opcode.name in _ACTING:
                if opcode.name in {"GLOBAL", "INST"} and not _importable_name(arg):
                    return None  # the unpickler fails on this name without importing anything
                return f"{opcode.name} {arg}" if arg is not None else opcode.name
            if opcode.name == "STOP":
                return "a complete pickle"
    except Exception:  # genops raises ValueError, struct errors, UnicodeDecodeError on broken streams
        return None
    return None


def _importable_name(arg: object) -> bool:
    parts = str(arg).split(" ")
    return len(parts) == 2 and all(_DOTTED.fullmatch(p) for p in parts)


@contextlib.contextmanager
def _stream(f: BinaryIO) -> Iterator[BinaryIO | mmap.mmap]:
    # genops reads opcode by opcode: over a map of the file nothing is copied up front
    f.seek(0)
    try:
        fileno = f.fileno()
    except (OSError, io.UnsupportedOperation):
        yield f
        return
    with mmap.mmap(fileno, 0, access=mmap.ACCESS_READ) as mm:
        yield mm

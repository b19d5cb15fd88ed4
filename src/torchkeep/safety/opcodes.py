"""The pickle opcodes the unpickler reads by table, and their names for messages."""

from __future__ import annotations

import pickletools
import struct

__all__ = ["MAX_PROTOCOL", "OBJECT_OPS", "STRING_OPS", "U32", "WIDTH_FORMAT", "opcode_label"]

# the newest pickle protocol the unpickler reads
MAX_PROTOCOL = 5

# opcode -> (width of the length field, what to build)
STRING_OPS: dict[int, tuple[int, str]] = {
    0x8C: (1, "str"),  # SHORT_BINUNICODE
    0x58: (4, "str"),  # BINUNICODE
    0x8D: (8, "str"),  # BINUNICODE8
    0x55: (1, "str"),  # SHORT_BINSTRING (Python 2 str)
    0x54: (-4, "str"),  # BINSTRING (signed length)
    0x43: (1, "bytes"),  # SHORT_BINBYTES
    0x42: (4, "bytes"),  # BINBYTES
    0x8E: (8, "bytes"),  # BINBYTES8
    0x96: (8, "bytearray"),  # BYTEARRAY8
}
WIDTH_FORMAT = {4: "<I", -4: "<i", 8: "<Q"}
# opcodes that make arbitrary objects: refused; in collect mode noted and stepped over
OBJECT_OPS = {0x81, 0x92, 0x6F, 0x69}  # NEWOBJ, NEWOBJ_EX, OBJ, INST
U32 = struct.Struct("<I")


def opcode_label(code: int) -> str:
    """The name of opcode byte ``code`` for messages (``"none"`` for a negative one: past the end)."""
    if code < 0:
        return "none"
    for op in pickletools.opcodes:
        if op.code == chr(code):
            return op.name
    return f"0x{code:02x} (not a pickle opcode)"

"""Hostile files aimed at the format decision: files that two readers would read two ways.

A reader that decides "safetensors" or "pickle" by one byte, or that trusts a
zip's members to say what it is, can be led to call a pickle safe. Each file
here is one such attempt; ``build(out)`` writes them and returns their
:class:`~_hostile.Case` index (the error every loader raises, scan's verdict).
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import torch

from _hostile import MARKER, PROTO, STOP, Case, call, glob, safetensors_bytes, text, wrap_dict


def _npy(descr: str, shape: str, body: bytes) -> bytes:
    header = f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (63 - len(header) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + body


def build(out: Path) -> list[Case]:
    """Write every file into ``out`` and return the index."""
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    payload = wrap_dict(call(glob("posix", "system"), text(f"touch {marker}")))
    cases: list[Case] = []

    def add(name: str, suffix: str, data: bytes, error: str, verdict: str) -> None:
        (out / f"{name}{suffix}").write_bytes(data)
        cases.append(Case(name, f"{name}{suffix}", error, verdict))

    # A safetensors layout whose first bytes are PROTO 2 + FRAME: the frame's length field
    # swallows the '{' and the first JSON key starts with R (REDUCE).
    length = 0x950280
    raw = json.dumps({"aR": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    add(
        "st_layout_that_reads_as_pickle",
        ".safetensors",
        struct.pack("<Q", length) + raw + b" " * (length - len(raw)) + bytes(4),
        "UnsafeFileError",
        "UNSAFE",
    )
    # A real pickle with '{' at byte 8 (inside a string): the damaged-safetensors fallback must
    # not hide its payload.
    brace = PROTO + b"U\x05abcd{0" + payload[2:]
    add("pickle_with_brace_at_byte_8", ".pt", brace, "UnsafeFileError", "UNSAFE")
    # A torch.save archive that is also a torch.export program (archive_format beside data.pkl).
    buffer = io.BytesIO()
    torch.save({"weight": torch.ones(2)}, buffer)
    both = io.BytesIO()
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(both, "w") as dst:
        root = src.namelist()[0].split("/")[0]
        for name in src.namelist():
            dst.writestr(name, src.read(name))
        dst.writestr(f"{root}/archive_format", "pt2")
    add("zip_torch_save_and_program", ".pt", both.getvalue(), "UnsafeFileError", "UNSAFE")
    # safetensors headers with numbers no header needs
    for name, number in (("st_5000_digit_int", "9" * 5000), ("st_nan", "NaN"), ("st_infinity", "-Infinity")):
        header = '{"w": {"dtype": "F32", "shape": [' + number + '], "data_offsets": [0, 4]}}'
        add(name, ".safetensors", safetensors_bytes(header, bytes(4)), "CorruptFileError", "CORRUPT")
    # a safetensors file cut inside its header, whose length field starts like PROTO 2
    pad = 0x280 - len(json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}))
    full = safetensors_bytes(
        json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}) + " " * pad, bytes(4)
    )
    add("st_cut_length_like_proto", ".safetensors", full[:0x100], "CorruptFileError", "CORRUPT")
    # .npy files: a shape numpy would never write, and an object array (a pickle) inside an .npz
    add("npy_double_comma_shape", ".npy", _npy("'<f4'", "(1,,4)", bytes(16)), "UnknownFormatError", "CORRUPT")
    add(
        "npy_huge_dim",
        ".npy",
        _npy("'<f4'", "(" + "9" * 40 + ",)", bytes(4)),
        "UnknownFormatError",
        "CORRUPT",
    )
    npz = io.BytesIO()
    with zipfile.ZipFile(npz, "w") as z:
        z.writestr("ok.npy", _npy("'<f4'", "(1,)", bytes(4)))
        z.writestr("evil.npy", _npy("'|O'", "(1,)", payload[:-1] + STOP))
    add("npz_object_member", ".npz", npz.getvalue(), "UnknownFormatError", "UNSAFE")
    return cases

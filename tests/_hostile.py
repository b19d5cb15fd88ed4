"""A corpus of hostile model files, written by the tests (harmless payloads: they create a marker file).

Each case is one file and the error every loader must raise for it. The
families follow the published bypasses of pickle scanners and of
``torch.load(weights_only=True)``: dangerous imports reached directly or
through importlib / pkgutil / getattr chains, names computed on the stack,
memo confusion, frames that hide opcodes, data after the pickle, polyglots
(a pickle with a valid zip behind it), zip members whose local and central
names differ, duplicate or path-escaping members, storages whose declared
size does not match their data, out-of-bounds views, absurd shapes,
decompression bombs, and broken or overlapping safetensors headers.

``python tests/_hostile.py OUT_DIR`` writes the corpus and prints its index as JSON.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MARKER = "PWNED"


@dataclass(frozen=True)
class Case:
    name: str
    file: str
    error: str  # the torchkeep error every loader raises
    verdict: str  # what scan says


# -- a tiny pickle assembler (protocol 2) -------------------------------------


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + b"R"


def integer(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


PROTO = b"\x80\x02"
STOP = b"."


def touch(marker: Path) -> bytes:
    """A pickle expression that creates ``marker`` when run by a real unpickler."""
    return call(glob("os", "system"), text(f"touch {marker}"))


def wrap_dict(expr: bytes) -> bytes:
    """``{"weight": expr}`` as a complete pickle."""
    return PROTO + b"}" + text("weight") + expr + b"s" + STOP


# -- containers ---------------------------------------------------------------


def torch_zip(pkl: bytes, records: dict[str, bytes] | None = None, prefix: str = "archive") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", pkl)
        for name, data in (records or {}).items():
            archive.writestr(f"{prefix}/{name}", data)
        archive.writestr(f"{prefix}/version", b"3\n")
    return buffer.getvalue()


def benign_torch_file() -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.arange(4.0)}, buffer)
    return buffer.getvalue()


def tensor_expr(numel: int, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> bytes:
    """A tensor rebuilt from storage "0" (``numel`` floats) with the given geometry."""
    storage = (
        b"(" + text("storage") + glob("torch", "FloatStorage") + text("0") + text("cpu") + integer(numel)
    )
    storage += b"tQ"
    size_t = tup(*(integer(d) for d in size))
    stride_t = tup(*(integer(d) for d in stride))
    hooks = call(glob("collections", "OrderedDict"))
    return call(
        glob("torch._utils", "_rebuild_tensor_v2"), storage, integer(offset), size_t, stride_t, b"\x89", hooks
    )


def storage_pickle(numel: int, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> bytes:
    """``{"weight": tensor}`` with the tensor from :func:`tensor_expr`."""
    return PROTO + b"}" + text("weight") + tensor_expr(numel, size, stride, offset) + b"s" + STOP


def safetensors_bytes(header: dict[str, object] | str, data: bytes) -> bytes:
    raw = header if isinstance(header, str) else json.dumps(header)
    encoded = raw.encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def f32(n: int) -> dict[str, object]:
    return {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}


# -- zip surgery ----------------------------------------------------------------


def rename_local_header(data: bytes, old: str, new: str) -> bytes:
    """Change a member's name in its local header only (same length), leaving the central directory."""
    assert len(old) == len(new)
    at = data.index(b"PK\x03\x04" + data[4:26], 0)
    while at >= 0:
        name_len = struct.unpack_from("<H", data, at + 26)[0]
        if data[at + 30 : at + 30 + name_len] == old.encode():
            return data[: at + 30] + new.encode() + data[at + 30 + name_len :]
        at = data.find(b"PK\x03\x04", at + 4)
    raise ValueError(old)


def set_encrypted(data: bytes) -> bytes:
    out = bytearray(data)
    at = out.find(b"PK\x03\x04")
    out[at + 6] |= 1
    at = out.find(b"PK\x01\x02")
    out[at + 8] |= 1
    return bytes(out)


def duplicate_member_zip(first: bytes, second: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", first)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            archive.writestr("archive/data.pkl", second)
    return buffer.getvalue()


def bomb_zip(megabytes: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("archive/data.pkl", storage_pickle(megabytes << 18, (megabytes << 18,), (1,)))
        with archive.open("archive/data/0", "w", force_zip64=True) as member:
            zeros = bytes(1 << 20)
            for _ in range(megabytes):
                member.write(zeros)
    return buffer.getvalue()


def legacy_payload(marker: Path) -> bytes:
    import pickle

    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    version = pickle.dumps(1001, protocol=2)
    info = pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {}}, protocol=2)
    return magic + version + info + wrap_dict(touch(marker)) + pickle.dumps([], protocol=2)


# -- the corpus ---------------------------------------------------------------


def build(out: Path) -> list[Case]:
    """Write every hostile file into ``out`` and return the index."""
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    cases: list[Case] = []

    def add(name: str, suffix: str, data: bytes, error: str, verdict: str = "UNSAFE") -> None:
        file = f"{name}{suffix}"
        (out / file).write_bytes(data)
        cases.append(Case(name, file, error, verdict))

    def zipped(expr_pickle: bytes) -> bytes:
        return torch_zip(expr_pickle)

    unsafe = "UnsafeFileError"
    corrupt = "CorruptFileError"
    limit = "LimitExceededError"

    # dangerous imports, direct and disguised
    class Evil:
        def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
            return (os.system, (f"touch {marker}",))

    buffer = io.BytesIO()
    torch.save({"weight": torch.ones(2), "evil": Evil()}, buffer)
    add("torch_save_os_system", ".pt", buffer.getvalue(), unsafe)
    add(
        "builtins_exec",
        ".pt",
        zipped(wrap_dict(call(glob("builtins", "exec"), text(f"open('{marker}','w')")))),
        unsafe,
    )
    add(
        "builtins_eval",
        ".pth",
        zipped(wrap_dict(call(glob("builtins", "eval"), text(f"open('{marker}','w')")))),
        unsafe,
    )
    via_importlib = call(
        glob("builtins", "getattr"), call(glob("importlib", "import_module"), text("os")), text("system")
    )
    add("importlib_chain", ".bin", zipped(wrap_dict(call(via_importlib, text(f"touch {marker}")))), unsafe)
    via_pkgutil = call(glob("pkgutil", "resolve_name"), text("os:system"))
    add("pkgutil_resolve_name", ".pt", zipped(wrap_dict(call(via_pkgutil, text(f"touch {marker}")))), unsafe)
    stack_global = text("os") + text("system") + b"\x93" + tup(text(f"touch {marker}")) + b"R"
    add(
        "stack_global_computed",
        ".pt",
        zipped(PROTO[:1] + b"\x04" + b"}" + text("w") + stack_global + b"s" + STOP),
        unsafe,
    )
    string_fed = b"S'os'\n" + b"S'system'\n" + b"\x93" + tup(text(f"touch {marker}")) + b"R"
    add(
        "stack_global_from_string",
        ".pt",
        zipped(PROTO[:1] + b"\x04" + b"}" + text("w") + string_fed + b"s" + STOP),
        unsafe,
    )
    memo = glob("collections", "OrderedDict") + b"q\x00" + b"0" + glob("os", "system") + b"q\x00" + b"0"
    memo += b"h\x00" + tup(text(f"touch {marker}")) + b"R"
    add("memo_confusion", ".pt", zipped(PROTO + b"}" + text("w") + memo + b"s" + STOP), unsafe)
    nested_loads = call(glob("pickle", "loads"), b"C" + bytes([len(b"x")]) + b"x")
    add("nested_pickle_loads", ".pt", zipped(wrap_dict(nested_loads)), unsafe)
    nested_torch = call(glob("torch", "load"), text(str(out / "other.pt")))
    add("nested_torch_load", ".ckpt", zipped(wrap_dict(nested_torch)), unsafe)
    # frames and trailing data
    body = b"}" + text("w") + touch(marker) + b"s"
    short_frame = b"\x80\x04" + b"\x95" + struct.pack("<Q", 3) + body + STOP
    add("frame_shorter_than_opcodes", ".pt", zipped(short_frame), corrupt, "CORRUPT")
    framed = b"\x80\x04" + b"\x95" + struct.pack("<Q", len(body)) + body + STOP
    add("frame_holding_payload", ".pt", zipped(framed), unsafe)
    add("payload_then_garbage", ".pt", zipped(wrap_dict(touch(marker)) + b"\xff" * 64), unsafe)
    # polyglots: a payload pickle with a benign torch zip behind it, under every suffix
    polyglot = wrap_dict(touch(marker)) + benign_torch_file()
    for suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        add(f"polyglot_pickle_then_zip{suffix.replace('.', '_')}", suffix, polyglot, unsafe)
    add("junk_before_zip", ".pt", b"\x00" * 128 + benign_torch_file(), "UnknownFormatError", "ERROR")
    add("legacy_format_payload", ".pt", legacy_payload(marker), unsafe)
    # zip trickery
    evil_zip = torch_zip(wrap_dict(touch(marker)))
    add(
        "zip_local_central_mismatch",
        ".pt",
        rename_local_header(evil_zip, "archive/data.pkl", "archive/data.pkx"),
        unsafe,
    )
    add(
        "zip_duplicate_data_pkl",
        ".pt",
        duplicate_member_zip(storage_pickle(4, (4,), (1,)), wrap_dict(touch(marker))),
        unsafe,
    )
    slip = io.BytesIO()
    with zipfile.ZipFile(slip, "w") as archive:
        archive.writestr("archive/data.pkl", wrap_dict(text("x")))
        archive.writestr("archive/../../escape", b"x")
    add("zip_slip", ".pt", slip.getvalue(), unsafe)
    add("zip_encrypted", ".pt", set_encrypted(torch_zip(wrap_dict(text("x")))), unsafe)
    add("zip_broken_tail", ".pt", benign_torch_file()[:-30], corrupt, "CORRUPT")
    add("decompression_bomb", ".pt", bomb_zip(64), limit)
    # tensors that lie about their data
    add(
        "storage_size_mismatch",
        ".pt",
        torch_zip(storage_pickle(1 << 20, (1 << 20,), (1,)), {"data/0": bytes(16)}),
        corrupt,
        "CORRUPT",
    )
    # CVE-2026-24747 style: SETITEM on a tensor writes to memory torch.load believes is there
    tensor_target = PROTO + tensor_expr(4, (4,), (1,)) + integer(1 << 30) + integer(7) + b"s" + STOP
    add("setitem_on_tensor", ".pt", torch_zip(tensor_target, {"data/0": bytes(16)}), unsafe)
    add(
        "view_out_of_bounds",
        ".pt",
        torch_zip(storage_pickle(4, (4,), (1,), offset=100), {"data/0": bytes(16)}),
        unsafe,
    )
    add(
        "view_stride_escape",
        ".pt",
        torch_zip(storage_pickle(4, (2, 2), (1000, 1)), {"data/0": bytes(16)}),
        unsafe,
    )
    add(
        "absurd_shape",
        ".pt",
        torch_zip(storage_pickle(4, (1 << 30, 1 << 30), (0, 0)), {"data/0": bytes(16)}),
        limit,
    )
    dunder = (
        PROTO + call(glob("collections", "OrderedDict")) + b"}" + text("__class__") + text("x") + b"sb" + STOP
    )
    add("build_sets_dunder", ".pt", torch_zip(dunder), unsafe)
    cycle = PROTO + b"]q\x00h\x00a" + STOP
    add("self_referencing_list", ".pt", torch_zip(cycle), unsafe)
    deep = PROTO + b"N" + b"\x85" * 5000 + STOP  # ((((None,),),),...) 5000 deep
    add("nesting_bomb", ".pt", torch_zip(deep), limit)
    # numpy
    import numpy as np

    npy = io.BytesIO()
    np.save(npy, np.array([Evil()], dtype=object), allow_pickle=True)
    add("object_dtype_npy", ".npy", npy.getvalue(), "UnknownFormatError")
    add("raw_pickle_payload", ".pkl", wrap_dict(touch(marker)), unsafe)
    # safetensors
    data16 = bytes(16)
    add("st_header_bomb", ".safetensors", struct.pack("<Q", 1 << 60) + b"{}", limit)
    add(
        "st_overlap",
        ".safetensors",
        safetensors_bytes({"a": f32(4), "b": f32(4)}, data16),
        corrupt,
        "CORRUPT",
    )
    add(
        "st_duplicate_key",
        ".safetensors",
        safetensors_bytes(f'{{"a": {json.dumps(f32(4))}, "a": {json.dumps(f32(4))}}}', data16),
        corrupt,
        "CORRUPT",
    )
    add(
        "st_trailing_data",
        ".safetensors",
        safetensors_bytes({"a": f32(4)}, data16 + b"payload"),
        corrupt,
        "CORRUPT",
    )
    add(
        "st_bidi_name",
        ".safetensors",
        safetensors_bytes({"lm\u202ehead": f32(4)}, data16),
        corrupt,
        "CORRUPT",
    )
    huge = {"a": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}}
    add("st_shape_overflow", ".safetensors", safetensors_bytes(huge, data16), limit)
    add(
        "st_broken_json",
        ".safetensors",
        safetensors_bytes('{"a": {"dtype": "F32", ', b""),
        corrupt,
        "CORRUPT",
    )
    return cases


if __name__ == "__main__":
    index = build(Path(sys.argv[1]))
    print(json.dumps([asdict(c) for c in index]))

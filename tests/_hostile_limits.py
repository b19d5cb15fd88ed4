"""Hostile files that exhaust resources, confuse zip readers, crash builders or bend metadata.

The companion of ``tests/_hostile.py`` (same :class:`Case`): every file here was
accepted, crashed with a builtin error, or ran for minutes / gigabytes in an
earlier torchkeep. The classes:

* **A** zip member names that differ only in case (torch's miniz reader
  finds names case-insensitively, so it may read another member than we do);
* **B** resource floods inside the default limits: memo, DUP, empty containers
  (compressed 80:1 in the zip), hash-colliding dict and set keys, tensor views
  whose logical size dwarfs their storage;
* **C** values that made builders raise ``TypeError`` / ``OverflowError`` /
  ``RecursionError`` (unhashable keys, ``complex(10**400)``, 2**70 strides) and
  checkpoint layouts of the wrong types;
* **D** metadata that changes what is loaded (``torchkeep.aliases``) or is
  not what torchkeep writes.

``error`` is what ``load_weights``, ``load_checkpoint`` and ``load_into`` all
raise, ``verdict`` what ``scan`` says (SAFE where the refusal is about what
the content is, not about the file being hostile or broken).
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch

from _hostile import (
    PROTO,
    STOP,
    Case,
    call,
    f32,
    glob,
    integer,
    safetensors_bytes,
    storage_pickle,
    text,
    torch_zip,
    tup,
)

P4 = b"\x80\x04"
MODULUS = sys.hash_info.modulus  # 2**61 - 1
MEMOIZE, DUP, POP, EMPTY_LIST, EMPTY_SET, MARK = b"\x94", b"2", b"0", b"]", b"\x8f", b"("


def long1(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8 or 1, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def num(n: int) -> bytes:
    return integer(n) if -(2**31) <= n < 2**31 else long1(n)


def tensor_at(numel: int, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> bytes:
    """A float tensor on storage "0" of ``numel`` elements, with any geometry (ints of any size)."""
    storage = (
        b"(" + text("storage") + glob("torch", "FloatStorage") + text("0") + text("cpu") + num(numel) + b"tQ"
    )
    hooks = call(glob("collections", "OrderedDict"))
    return call(
        glob("torch._utils", "_rebuild_tensor_v2"),
        storage,
        num(offset),
        tup(*(num(d) for d in size)),
        tup(*(num(d) for d in stride)),
        b"\x89",
        hooks,
    )


def weights_pickle(*tensors: bytes) -> bytes:
    """``{"w0": t0, "w1": t1, ...}`` as a complete pickle."""
    return PROTO + b"}" + MARK + b"".join(text(f"w{i}") + t for i, t in enumerate(tensors)) + b"u" + STOP


def double(x: float) -> bytes:
    return b"G" + struct.pack(">d", x)


def deflated_torch_zip(body: bytes, *, ratio: int = 80) -> bytes:
    """A torch.save-like zip whose data.pkl (``PROTO4 + pad + body``) is DEFLATEd at about ``ratio``:1.

    Random bytes in a BINBYTES that is popped keep the ratio under the reader's
    100:1 cap, as an attacker would.
    """
    pad = 0
    while True:
        noise = os.urandom(pad)
        pkl = P4 + b"B" + struct.pack("<I", pad) + noise + POP + body
        packed = zipfile.ZipFile
        buffer = io.BytesIO()
        with packed(buffer, "w") as archive:
            archive.writestr(
                zipfile.ZipInfo("archive/data.pkl"), pkl, compress_type=zipfile.ZIP_DEFLATED, compresslevel=1
            )
            archive.writestr("archive/version", b"3\n")
        info = zipfile.ZipFile(io.BytesIO(buffer.getvalue())).getinfo("archive/data.pkl")
        if info.file_size <= info.compress_size * 95:
            return buffer.getvalue()
        pad = max(pad * 2, len(pkl) // ratio - info.compress_size + pad)


def zip_members(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def build(out: Path) -> list[Case]:
    """Write every file into ``out`` and return the index."""
    out.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, suffix: str, data: bytes, error: str, verdict: str) -> None:
        file = f"{name}{suffix}"
        (out / file).write_bytes(data)
        cases.append(Case(name, file, error, verdict))

    unsafe, corrupt, limit, content = (
        "UnsafeFileError",
        "CorruptFileError",
        "LimitExceededError",
        "NotAStateDictError",
    )
    benign = storage_pickle(4, (4,), (1,))
    payload = PROTO + b"}" + text("w") + call(glob("os", "system"), text("true")) + b"s" + STOP
    data0 = {"data/0": bytes(16)}

    # -- A: names that fold together --------------------------------------------------
    add(
        "zip_case_two_pickles",
        ".pt",
        zip_members(
            [("archive/data.pkl", benign), ("archive/DATA.PKL", payload), ("archive/data/0", bytes(16))]
        ),
        unsafe,
        "UNSAFE",
    )
    add(
        "zip_case_only_upper_pickle",
        ".pt",
        zip_members([("archive/Data.Pkl", payload), ("archive/version", b"3\n")]),
        unsafe,
        "UNSAFE",
    )
    add(
        "zip_case_two_records",
        ".pt",
        zip_members(
            [("archive/data.pkl", benign), ("archive/data/0", bytes(16)), ("archive/DATA/0", b"\xff" * 16)]
        ),
        unsafe,
        "UNSAFE",
    )
    add(
        "zip_case_record_keys",
        ".pt",
        zip_members(
            [
                ("archive/data.pkl", benign.replace(text("0"), text("a"))),
                ("archive/data/a", bytes(16)),
                ("archive/data/A", b"\xff" * 16),
            ]
        ),
        unsafe,
        "UNSAFE",
    )
    add(
        "zip_case_kelvin_sign",
        ".pt",
        zip_members(
            [
                ("archive/data.pkl", benign.replace(text("0"), text("k"))),
                ("archive/data/k", bytes(16)),
                ("archive/data/\u212a", b"\xff" * 16),  # KELVIN SIGN: NFKC -> "K"
            ]
        ),
        unsafe,
        "UNSAFE",
    )
    add(
        "zip_case_version",
        ".pt",
        zip_members(
            [
                ("archive/data.pkl", benign),
                ("archive/data/0", bytes(16)),
                ("archive/version", b"3\n"),
                ("archive/VERSION", b"9\n"),
            ]
        ),
        unsafe,
        "UNSAFE",
    )

    # -- B: floods -------------------------------------------------------------------
    flood = 30_000_000
    add("memo_flood_deflated", ".pt", deflated_torch_zip(b"N" + MEMOIZE * flood + STOP), limit, "UNSAFE")
    add("dup_flood_deflated", ".pt", deflated_torch_zip(b"N" + DUP * flood + STOP), limit, "UNSAFE")
    add("empty_list_flood_deflated", ".pt", deflated_torch_zip(EMPTY_LIST * flood + STOP), limit, "UNSAFE")
    overwrite = b"N" + (b"r" + struct.pack("<I", 0xFFFFFFFF)) * (flood // 5) + STOP
    add("binput_overwrite_flood_deflated", ".pt", deflated_torch_zip(overwrite), limit, "UNSAFE")
    add("memo_flood_stored", ".pt", torch_zip(P4 + b"N" + MEMOIZE * 8_000_000 + STOP), limit, "UNSAFE")
    add("empty_set_flood_stored", ".pt", torch_zip(P4 + EMPTY_SET * 2_000_000 + STOP), limit, "UNSAFE")
    add("mark_chain", ".pt", torch_zip(PROTO + MARK * 100_000 + b"N" + STOP), limit, "UNSAFE")
    colliding = [k * MODULUS for k in range(1, 120_001)]
    items = b"".join(long1(k) + b"N" for k in colliding)
    add("hash_flood_dict", ".pt", torch_zip(PROTO + b"}" + MARK + items + b"u" + STOP), unsafe, "UNSAFE")
    set_items = b"".join(long1(k) for k in colliding)
    set_items_5000 = b"".join(long1(k) for k in colliding[:5000])
    add(
        "hash_flood_set",
        ".pt",
        torch_zip(P4 + EMPTY_SET + MARK + set_items + b"\x90" + STOP),
        unsafe,
        "UNSAFE",
    )
    add("hash_flood_frozenset", ".pt", torch_zip(P4 + MARK + set_items + b"\x91" + STOP), unsafe, "UNSAFE")
    floats = b"".join(double(2.0 ** (61 * k)) + b"N" for k in range(-17, 17))  # all hash to 1
    add(
        "hash_flood_float_keys",
        ".pt",
        torch_zip(PROTO + b"}" + MARK + floats + b"u" + STOP),
        unsafe,
        "UNSAFE",
    )
    pairs = b"]" + MARK + b"".join(tup(long1(k), b"N") for k in colliding[:5000]) + b"e"
    add(
        "hash_flood_ordered_dict",
        ".pt",
        torch_zip(PROTO + call(glob("collections", "OrderedDict"), pairs) + STOP),
        unsafe,
        "UNSAFE",
    )
    add(
        "hash_flood_builtin_set",
        ".pt",
        torch_zip(PROTO + call(glob("builtins", "set"), b"]" + MARK + set_items_5000 + b"e") + STOP),
        unsafe,
        "UNSAFE",
    )
    one = {"data/0": bytes(4)}
    add(
        "stride0_huge_view",
        ".pt",
        torch_zip(weights_pickle(tensor_at(1, (1 << 40,), (0,))), one),
        limit,
        "UNSAFE",
    )
    many = weights_pickle(*(tensor_at(1, (1 << 36,), (0,)) for _ in range(20)))
    add("stride0_many_views", ".pt", torch_zip(many, one), limit, "UNSAFE")
    square = weights_pickle(tensor_at(1, (1 << 20, 1 << 20), (0, 0)))
    add("stride0_2d_view", ".pt", torch_zip(square, one), limit, "UNSAFE")
    add(
        "stride_2_pow_70",
        ".pt",
        torch_zip(weights_pickle(tensor_at(4, (1,), (1 << 70,))), data0),
        unsafe,
        "UNSAFE",
    )
    zero_dim = weights_pickle(tensor_at(4, (1 << 70, 0), (1, 1)))
    add("shape_2_pow_70_times_0", ".pt", torch_zip(zero_dim, data0), limit, "UNSAFE")
    offset = weights_pickle(tensor_at(4, (0,), (1,), 1 << 70))
    add("offset_2_pow_70", ".pt", torch_zip(offset, data0), unsafe, "UNSAFE")
    huge_list = b"]" + MARK + b"N" * 3_000_000 + b"e"
    storage = (
        b"(" + text("storage") + glob("torch", "FloatStorage") + text("0") + text("cpu") + integer(4) + b"tQ"
    )
    listed = call(
        glob("torch._utils", "_rebuild_tensor_v2"),
        storage,
        integer(0),
        huge_list,
        tup(integer(1)),
        b"\x89",
        call(glob("collections", "OrderedDict")),
    )
    add("size_is_a_huge_list", ".pt", torch_zip(weights_pickle(listed), data0), unsafe, "UNSAFE")
    add(
        "torch_size_2_pow_70",
        ".pt",
        torch_zip(PROTO + call(glob("torch", "Size"), tup(long1(1 << 70))) + STOP),
        unsafe,
        "UNSAFE",
    )

    # -- C: builders and layouts ---------------------------------------------------------
    add(
        "complex_10_pow_400",
        ".pt",
        torch_zip(PROTO + call(glob("builtins", "complex"), long1(10**400)) + STOP),
        unsafe,
        "UNSAFE",
    )
    add(
        "device_index_2_pow_70",
        ".pt",
        torch_zip(PROTO + call(glob("torch", "device"), text("cpu"), long1(1 << 70)) + STOP),
        unsafe,
        "UNSAFE",
    )
    add(
        "unhashable_builtin_set",
        ".pt",
        torch_zip(PROTO + call(glob("builtins", "set"), b"]" + MARK + b"]" + b"e") + STOP),
        unsafe,
        "UNSAFE",
    )
    add(
        "unhashable_ordered_dict_key",
        ".pt",
        torch_zip(
            PROTO + call(glob("collections", "OrderedDict"), b"]" + tup(b"]", integer(1)) + b"a") + STOP
        ),
        unsafe,
        "UNSAFE",
    )
    add("unhashable_setitem_key", ".pt", torch_zip(PROTO + b"}]Ns" + STOP), corrupt, "CORRUPT")
    add("unhashable_frozenset_item", ".pt", torch_zip(P4 + MARK + b"]" + b"\x91" + STOP), corrupt, "CORRUPT")
    deep_key = b"N" + b"\x85" * 100_000
    add("deep_tuple_key", ".pt", torch_zip(PROTO + b"}" + deep_key + b"Ns" + STOP), corrupt, "CORRUPT")
    build_values = (
        PROTO + call(glob("collections", "OrderedDict")) + b"}" + text("values") + integer(1) + b"sb" + STOP
    )
    add("ordered_dict_build_values", ".pt", torch_zip(build_values), unsafe, "UNSAFE")
    build_meta = (
        PROTO + call(glob("collections", "OrderedDict")) + b"}" + text("_metadata") + b"]" + b"sb" + STOP
    )
    add("ordered_dict_build_metadata_list", ".pt", torch_zip(build_meta), unsafe, "UNSAFE")
    deep_state = b"N" + b"N\x86" * 50_000  # (((None, None), None), ...) 50,000 deep
    param = call(
        glob("torch._utils", "_rebuild_parameter"),
        tensor_at(4, (4,), (1,)),
        b"\x89",
        call(glob("collections", "OrderedDict")),
        deep_state,
    )
    add(
        "parameter_deep_state",
        ".pt",
        torch_zip(PROTO + b"}" + text("w") + param + b"s" + STOP, data0),
        unsafe,
        "UNSAFE",
    )
    lightning = {"pytorch-lightning_version": "2.4.0", "epoch": 1, "global_step": 10}
    add(
        "lightning_optimizer_states_dict",
        ".ckpt",
        saved({**lightning, "optimizer_states": {"adam": {}}}),
        content,
        "SAFE",
    )
    add(
        "lightning_lr_schedulers_str",
        ".ckpt",
        saved({**lightning, "lr_schedulers": "cosine"}),
        content,
        "SAFE",
    )
    ours = {"torchkeep": {"format_version": 1}, "epoch": 3}
    add("checkpoint_metrics_str", ".pt", saved({**ours, "metrics": "val_loss=0.1"}), content, "SAFE")
    add(
        "checkpoint_loss_three_values",
        ".pt",
        saved({**ours, "loss": torch.tensor([0.1, 0.2, 0.3])}),
        content,
        "SAFE",
    )
    add("checkpoint_loss_10_pow_400", ".pt", saved({**ours, "loss": 10**400}), content, "SAFE")
    add("checkpoint_epoch_str", ".pt", saved({**ours, "epoch": "three"}), content, "SAFE")
    add("checkpoint_extra_list", ".pt", saved({**ours, "extra": [1, 2]}), content, "SAFE")

    # -- D: metadata ----------------------------------------------------------------------
    header: dict[str, object] = {"a": f32(4), "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    values = struct.pack("<4f", 1, 2, 3, 4) + struct.pack("<4f", -1, -2, -3, -4)

    def aliased(aliases: str) -> bytes:
        return safetensors_bytes(
            {**header, "__metadata__": {"format": "pt", "torchkeep.aliases": aliases}}, values
        )

    # safetensors metadata is not read by scan (formats.py's header check): SAFE there
    add("st_alias_shadows_stored_key", ".safetensors", aliased(json.dumps({"a": "b"})), corrupt, "CORRUPT")
    add("st_alias_to_itself", ".safetensors", aliased(json.dumps({"a": "a"})), corrupt, "CORRUPT")
    add("st_alias_chain", ".safetensors", aliased(json.dumps({"c": "d", "d": "a"})), corrupt, "CORRUPT")
    add("st_alias_missing_target", ".safetensors", aliased(json.dumps({"c": "zzz"})), corrupt, "CORRUPT")
    add("st_alias_not_an_object", ".safetensors", aliased(json.dumps(["a", "b"])), corrupt, "CORRUPT")
    add("st_alias_non_str_target", ".safetensors", aliased(json.dumps({"c": 5})), corrupt, "CORRUPT")
    add("st_alias_bad_json", ".safetensors", aliased('{"c": "a"'), corrupt, "CORRUPT")
    add("st_alias_deep_json", ".safetensors", aliased("[" * 100_000), corrupt, "CORRUPT")
    add("st_alias_5000_digits", ".safetensors", aliased('{"c": ' + "9" * 5000 + "}"), corrupt, "CORRUPT")
    weights = saved({"w": torch.ones(2)})
    for name, record in {
        "pt_metadata_record_list": b"[1, 2]",
        "pt_metadata_record_non_str": b'{"a": 1}',
        "pt_metadata_record_bad_json": b'{"a": ',
    }.items():
        with zipfile.ZipFile(io.BytesIO(weights)) as original:
            prefix = original.namelist()[0].split("/", 1)[0]
            members = [(n, original.read(n)) for n in original.namelist()]
        add(
            name,
            ".pt",
            zip_members([*members, (f"{prefix}/extra/torchkeep_metadata.json", record)]),
            corrupt,
            "CORRUPT",
        )
    return cases


if __name__ == "__main__":
    print(json.dumps([asdict(c) for c in build(Path(sys.argv[1]))]))

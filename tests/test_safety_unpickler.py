"""The allowlist interpreter's bounds: memo, build budget, hash floods, keys, views, builders.

Each bound is shown from both sides: a benign pickle of the same shape loads
exactly as ``pickle.loads`` / ``torch.load`` read it, and the flood is refused
with the typed error naming the limit to raise.
"""

from __future__ import annotations

import collections
import pickle
import pickletools
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep
from _hostile import PROTO, STOP, call, glob, text, torch_zip, tup
from torchkeep.safety import Limits, load_torch_file
from torchkeep.safety.allowlist import Refusal, brief, check_keys
from torchkeep.safety.limits import MAX_SAME_HASH
from torchkeep.safety.structure import check_structure
from torchkeep.safety.unpickler import Unpickler

MODULUS = sys.hash_info.modulus


def run(data: bytes, limits: Limits | None = None, *, stored_size: int | None = None) -> Any:
    unpickler = Unpickler(
        data,
        path=Path("x.pkl"),
        member=None,
        storages=None,
        limits=limits or Limits(),
        stored_size=stored_size,
    )
    return unpickler.run()


def long1(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


# -- memo ----------------------------------------------------------------------------


SHARED: Any = {"a": [1, 2, (3, "x")], "b": None}
VALUES = [SHARED, [SHARED, SHARED], {"k": SHARED, "t": (SHARED, [SHARED])}, ["s"] * 300]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("index", range(len(VALUES)))
def test_memo_reads_what_pickle_reads_also_with_gaps_left_by_optimize(protocol: int, index: int) -> None:
    raw = pickle.dumps(VALUES[index], protocol=protocol)
    for data in (raw, pickletools.optimize(raw)):
        ours, theirs = run(data), pickle.loads(data)
        assert ours == theirs
        if isinstance(theirs, list) and len(theirs) == 2:
            assert ours[0] is ours[1]  # shared references stay shared


def test_sparse_and_overwritten_memo_entries_follow_pickle() -> None:
    # LONG_BINPUT far past the end, BINPUT overwriting, then gets of both
    data = PROTO + text("a") + b"r" + struct.pack("<I", 10**6) + b"0"
    data += text("b") + b"q\x00" + b"0" + text("c") + b"q\x00" + b"0"
    data += b"(" + b"j" + struct.pack("<I", 10**6) + b"h\x00" + b"t" + STOP
    assert run(data) == pickle.loads(data) == ("a", "c")


def test_a_memo_entry_never_written_is_corrupt() -> None:
    with pytest.raises(torchkeep.CorruptFileError, match="memo entry it never wrote"):
        run(PROTO + b"h\x05" + STOP)


def test_memo_entries_are_bounded_by_the_pickle_size() -> None:
    flood = b"\x80\x04N" + b"\x94" * 100_000 + STOP
    with pytest.raises(torchkeep.LimitExceededError) as info:
        run(flood)
    assert info.value.limit == "max_memo"
    assert info.value.maximum <= len(flood) // 2 + 1
    legit = pickle.dumps([str(i) for i in range(10_000)], protocol=4)  # one MEMOIZE per string
    assert run(legit) == pickle.loads(legit)


# -- the build budget ----------------------------------------------------------------


def test_what_a_pickle_builds_is_bounded_by_its_stored_size() -> None:
    sets = b"\x80\x04(" + b"\x8f" * 400_000 + b"l" + STOP  # 216-byte sets from one byte each
    with pytest.raises(torchkeep.LimitExceededError) as info:
        run(sets, Limits(max_build_ratio=128))
    assert info.value.limit == "max_build_ratio"
    assert len(run(sets, Limits(max_build_ratio=400))) == 400_000  # the limit is the knob


def test_a_compressed_pickle_gets_its_stored_share_only() -> None:
    data = b"\x80\x04N" + b"2" * 10_000_000 + b"0" * 10_000_000 + STOP  # DUP then POP: nothing kept
    assert run(data) is None
    with pytest.raises(torchkeep.LimitExceededError) as info:
        run(data, stored_size=len(data) // 80)  # as a DEFLATE member at 80:1
    assert info.value.limit == "max_build_ratio"


def test_real_torch_files_fit_the_budget_with_room(tmp_path: Path) -> None:
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(200)])
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}, path)
    # ten times tighter than the default still reads it: benign files build ~3-15 bytes per byte
    tight = Limits(max_build_ratio=16)
    loaded = load_torch_file(path, limits=tight)
    assert loaded["epoch"] == 3
    assert torch.equal(loaded["model"]["0.weight"], model.state_dict()["0.weight"])


# -- keys ------------------------------------------------------------------------------


def test_keys_sharing_one_hash_are_refused_as_a_flood() -> None:
    items = b"".join(long1(k * MODULUS) + b"N" for k in range(1, 1000))
    with pytest.raises(torchkeep.UnsafeFileError, match="share one hash"):
        run(PROTO + b"}(" + items + b"u" + STOP)
    floats = {2.0 ** (61 * k): None for k in range(-17, 17)}  # every one hashes to 1
    assert len({hash(k) for k in floats}) == 1
    with pytest.raises(torchkeep.UnsafeFileError, match="share one hash"):
        run(pickle.dumps(floats, protocol=2))


def test_ordinary_keys_of_every_kind_load_like_pickle() -> None:
    value = {
        "ints": {i: i for i in range(-5000, 5000)},
        "big": {MODULUS - 1: 1, -(MODULUS - 1): 2, 2**100: 3},
        "tuples": {(i, "a"): i for i in range(2000)},
        "floats": {i / 7: i for i in range(2000)},
        "sets": [set(range(100)), frozenset({(1, 2), "x"})],
        "same_key_twice": {MODULUS: 1},
    }
    data = pickle.dumps(value, protocol=2)
    assert run(data) == pickle.loads(data)
    # the same colliding key set again and again is one key, not a flood
    again = PROTO + b"}" + (long1(MODULUS) + b"Ns") * (MAX_SAME_HASH * 4) + STOP
    assert run(again) == {MODULUS: None}


def test_unhashable_and_oversized_keys_are_corrupt() -> None:
    with pytest.raises(torchkeep.CorruptFileError, match="unhashable"):
        run(PROTO + b"}]Ns" + STOP)
    with pytest.raises(torchkeep.CorruptFileError, match="nested"):
        run(PROTO + b"}N" + b"\x85" * 10_000 + b"Ns" + STOP)  # hashing it would recurse 10,000 deep
    with pytest.raises(Refusal, match="unhashable"):
        check_keys([[1]])


# -- structure ----------------------------------------------------------------------------


def test_check_structure_finds_a_cycle_through_a_sibling() -> None:
    a: list[Any] = []
    x: list[Any] = [a]
    a.append(x)
    with pytest.raises(torchkeep.UnsafeFileError, match="cycle"):
        check_structure([a, x], path=Path("x"), limits=Limits())


def test_check_structure_is_linear_in_distinct_containers() -> None:
    inner = [1.0] * 10
    value = [[inner] * 1000 for _ in range(1000)]  # a million references to one list
    check_structure(value, path=Path("x"), limits=Limits())
    diamond: Any = None
    for _ in range(100):  # 2**100 paths, 100 containers
        diamond = [diamond, diamond]
    check_structure(diamond, path=Path("x"), limits=Limits(max_depth=200))


def test_brief_costs_nothing_on_huge_or_deep_values() -> None:
    deep: Any = ()
    for _ in range(100_000):
        deep = (deep,)
    assert len(brief(deep)) <= 80
    assert brief(list(range(10**6))).startswith("list of 1000000 [0, 1, 2")
    assert "bits" in brief(10**400)


# -- tensors and builders ----------------------------------------------------------------


def _tensor_file(tmp_path: Path, size: tuple[int, ...], stride: tuple[int, ...], numel: int = 1) -> Path:
    def n(v: int) -> bytes:
        return long1(v) if v >= 2**31 else b"J" + struct.pack("<i", v)

    storage = (
        b"(" + text("storage") + glob("torch", "FloatStorage") + text("0") + text("cpu") + n(numel) + b"tQ"
    )
    tensor = call(
        glob("torch._utils", "_rebuild_tensor_v2"),
        storage,
        n(0),
        tup(*(n(d) for d in size)),
        tup(*(n(s) for s in stride)),
        b"\x89",
        call(glob("collections", "OrderedDict")),
    )
    path = tmp_path / "view.pt"
    path.write_bytes(torch_zip(PROTO + b"}" + text("w") + tensor + b"s" + STOP, {"data/0": bytes(4 * numel)}))
    return path


def test_a_views_logical_size_counts_against_max_bytes(tmp_path: Path) -> None:
    path = _tensor_file(tmp_path, (1 << 28,), (0,))  # 1 GiB of float32 over 4 bytes
    with pytest.raises(torchkeep.LimitExceededError) as info:
        load_torch_file(path, limits=Limits(max_bytes=1 << 29))
    assert (info.value.limit, info.value.value) == ("max_bytes", 1 << 30)
    assert load_torch_file(path)["w"].shape == (1 << 28,)  # within the default it is the view torch makes


def test_expanded_tensors_saved_by_torch_read_like_torch_load(tmp_path: Path) -> None:
    path = tmp_path / "expanded.pt"
    torch.save({"w": torch.arange(3.0).expand(4, 3)}, path)
    ours, theirs = load_torch_file(path)["w"], torch.load(path, weights_only=True)["w"]
    assert torch.equal(ours, theirs)
    assert ours.stride() == theirs.stride() == (0, 1)


@pytest.mark.parametrize(
    ("size", "stride", "error"),
    [
        ((1,), (1 << 70,), torchkeep.UnsafeFileError),
        ((1 << 70, 0), (1, 1), torchkeep.LimitExceededError),
        ((1,) * 65, (1,) * 65, torchkeep.UnsafeFileError),
    ],
)
def test_absurd_geometry_is_refused_before_torch_sees_it(
    tmp_path: Path, size: tuple[int, ...], stride: tuple[int, ...], error: type[Exception]
) -> None:
    with pytest.raises(error):
        load_torch_file(_tensor_file(tmp_path, size, stride, numel=4))


@pytest.mark.parametrize(
    "expr",
    [
        call(glob("builtins", "complex"), long1(10**400)),
        call(glob("torch", "Size"), tup(long1(1 << 70))),
        call(glob("torch", "Size"), tup(b"J" + struct.pack("<i", -5))),
        call(glob("torch", "device"), text("cpu"), long1(1 << 70)),
        call(glob("builtins", "set"), b"](]e"),
        call(glob("collections", "OrderedDict"), b"]" + tup(b"]", b"N") + b"a"),
    ],
)
def test_builders_refuse_values_that_would_raise_builtin_errors(tmp_path: Path, expr: bytes) -> None:
    path = tmp_path / "b.pt"
    path.write_bytes(torch_zip(PROTO + expr + STOP))
    with pytest.raises(torchkeep.UnsafeFileError):
        load_torch_file(path)
    assert torchkeep.scan(path).verdict == "UNSAFE"


def test_state_dict_metadata_survives_and_only_it_may_be_set(tmp_path: Path) -> None:
    model = torch.nn.BatchNorm1d(3)
    path = tmp_path / "bn.pt"
    torch.save(model.state_dict(), path)
    loaded = load_torch_file(path)
    assert loaded._metadata == torch.load(path, weights_only=True)._metadata
    for state in (b"}" + text("values") + b"Ns", b"}" + text("_metadata") + b"]s"):
        bad = PROTO + call(glob("collections", "OrderedDict")) + state + b"b" + STOP
        path.write_bytes(torch_zip(bad))
        with pytest.raises(torchkeep.UnsafeFileError, match=r"attribute|_metadata"):
            load_torch_file(path)


def test_a_raw_pickle_over_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.pkl"
    path.write_bytes(pickle.dumps(list(range(100_000)), protocol=2))
    result = torchkeep.scan(path, limits=Limits(max_pickle_bytes=1000))
    assert result.verdict == "UNSAFE"
    assert "max_pickle_bytes" in result.reason
    assert torchkeep.scan(path).verdict == "SAFE"


def test_counter_and_ordered_dict_builders_still_build(tmp_path: Path) -> None:
    value = {"c": collections.Counter("abca"), "o": collections.OrderedDict([("x", 1), ((1, 2), 2)])}
    path = tmp_path / "c.pt"
    torch.save(value, path)
    assert load_torch_file(path, limits=Limits()) == value


# -- opaque mode: objects that need code become inert placeholders -------------------------------


def run_opaque(data: bytes) -> Any:
    unpickler = Unpickler(data, path=Path("x.pkl"), member=None, storages=None, limits=Limits(), opaque=True)
    result = unpickler.run()
    check_structure(result, path=Path("x.pkl"), limits=Limits(), opaque=True)
    return result


class _Custom:
    def __init__(self) -> None:
        self.width = 4
        self.tags = ["a"]


class _Calls:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("never printed",))


def test_opaque_mode_records_newobj_build_and_reduce_as_plain_data() -> None:
    import argparse
    import datetime
    import pathlib

    from torchkeep.safety.opaque import Opaque

    value = {
        "ns": argparse.Namespace(lr=0.5),
        "obj": _Custom(),
        "path": pathlib.PurePosixPath("/a/b"),
        "day": datetime.date(2023, 12, 31),
        "call": _Calls(),
    }
    loaded = run_opaque(pickle.dumps(value, protocol=2))
    assert all(isinstance(v, Opaque) for v in loaded.values())
    assert (loaded["ns"].name, loaded["ns"].how, loaded["ns"].state) == (
        "argparse.Namespace",
        "new",
        {"lr": 0.5},
    )
    assert loaded["obj"].name.endswith("_Custom")
    assert loaded["obj"].state == {"width": 4, "tags": ["a"]}
    assert (loaded["path"].how, loaded["path"].args) == ("call", ("/", "a", "b"))
    assert loaded["day"].args == (bytes([7, 231, 12, 31]),)
    assert (loaded["call"].name, loaded["call"].args) == ("builtins.print", ("never printed",))


def test_opaque_placeholders_are_refused_by_every_other_reader() -> None:
    data = pickle.dumps({"x": _Custom()}, protocol=2)
    with pytest.raises(torchkeep.UnsafeFileError, match="_Custom"):
        run(data)  # the default interpreter: refused, as before
    unpickler = Unpickler(data, path=Path("x.pkl"), member=None, storages=None, limits=Limits(), opaque=True)
    built = unpickler.run()
    with pytest.raises(torchkeep.UnsafeFileError, match="Opaque"):
        check_structure(built, path=Path("x.pkl"), limits=Limits())  # without opaque=True


def test_opaque_mode_never_calls_the_result_of_a_call() -> None:
    # getattr(print, "__call__")("x"): a call of something a call returned
    data = PROTO + glob("builtins", "getattr") + glob("builtins", "print") + text("__call__") + b"\x86R"
    data += text("x") + b"\x85R" + STOP
    with pytest.raises(torchkeep.UnsafeFileError, match=r"by calling the result of builtins\.getattr"):
        run_opaque(data)


def test_opaque_mode_keeps_tensors_plain_and_refuses_placeholders_as_tensor_parts(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2), "cfg": _Custom()}, path)
    loaded = load_torch_file(path, opaque=True)
    assert torch.equal(loaded["w"], torch.ones(2))
    with pytest.raises(torchkeep.UnsafeFileError, match="_Custom"):
        torchkeep.load_weights(path)  # load_weights never uses opaque mode
    result = torchkeep.scan(path)
    assert result.verdict == "UNSAFE"


def test_rebuild_takes_only_exactly_what_the_value_types_pickle() -> None:
    import argparse
    import datetime
    import pathlib

    from torchkeep.safety.opaque import VALUE_TYPES, Opaque, rebuild

    stamp = datetime.datetime(2024, 2, 29, 13, 5, 7, 123456)
    value = {
        "ns": argparse.Namespace(when=stamp, where=pathlib.PurePosixPath("/x")),
        "delta": datetime.timedelta(days=2, seconds=5),
        "utc": datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc),
    }
    loaded = run_opaque(pickle.dumps(value, protocol=2))
    rebuilt = rebuild(loaded, VALUE_TYPES)
    assert rebuilt["ns"] == argparse.Namespace(when=stamp, where=pathlib.PurePosixPath("/x"))
    assert rebuilt["delta"] == datetime.timedelta(days=2, seconds=5)
    assert rebuilt["utc"] == datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    assert rebuild(loaded, ()) is loaded
    forged = [
        Opaque("pathlib.PosixPath", "call", ("/", Opaque("os.system", "call", ("id",)))),
        Opaque("datetime.date", "call", (b"\x07\xe8\x02",)),
        Opaque("datetime.date", "call", (b"\x07\xe8\x02\x30",)),  # February 48th
        Opaque("argparse.Namespace", "new", (), state={1: "not a name"}),
        Opaque("argparse.Namespace", "call", ("positional",)),
    ]
    assert all(isinstance(item, Opaque) for item in rebuild(forged, VALUE_TYPES))
    with pytest.raises(ValueError, match=r"cannot rebuild builtins\.eval"):
        rebuild(loaded, ("builtins.eval",))

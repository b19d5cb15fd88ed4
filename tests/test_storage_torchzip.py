"""The one-pass torch.save zip writer: torch.load and torchkeep's strict reader read what it writes."""

from __future__ import annotations

import io
import os
import pickletools
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep.safety import load_torch_file
from torchkeep.storage.torchzip import archive_root, pickle_state_dict, save_torch_zip, write_torch_zip

# every dtype torch.save stores with a storage class, and those it stores through _rebuild_tensor_v3
DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.complex128,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * dtype.itemsize,), dtype=torch.uint8)
    if dtype == torch.bool:
        raw = raw % 2
    n = torch.Size(shape).numel() * dtype.itemsize
    return raw[:n].view(dtype).reshape(shape).clone()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(expected)
    for key, want in expected.items():
        got = loaded[key]
        assert got.dtype == want.dtype, key
        assert got.shape == want.shape, key
        assert torch.equal(_bits(got), _bits(want)), key  # bitwise: NaNs and float8 compare too


def _write(path: Path, tensors: dict[str, torch.Tensor], records: dict[str, bytes] | None = None) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return write_torch_zip(fd, tensors, root=archive_root(path), records=records)
    finally:
        os.close(fd)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_reads_back_with_torch_load_and_torchkeep(tmp_path: Path, dtype: torch.dtype) -> None:
    state = {
        "matrix": _sample(dtype, (5, 7)),
        "scalar": _sample(dtype, ()),
        "empty": _sample(dtype, (0, 3)),
    }
    path = tmp_path / "w.pt"
    written = _write(path, state)
    assert written == path.stat().st_size
    _assert_same(torch.load(path, weights_only=True), state)
    _assert_same(torch.load(path, weights_only=True, mmap=True), state)
    _assert_same(load_torch_file(path), state)
    _assert_same(load_torch_file(path, mmap=True), state)


def test_tied_tensors_and_shared_storages_stay_shared(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32)
    weight = torch.randn(4, 3)
    state = {
        "encoder.weight": weight,
        "decoder.weight": weight,  # tied: the very same tensor
        "first": base[:12].view(3, 4),  # two views of one storage
        "second_t": base[12:].view(4, 3).t(),  # a transposed view at an offset
    }
    path = tmp_path / "w.pt"
    _write(path, state)
    for loaded in (torch.load(path, weights_only=True), load_torch_file(path)):
        _assert_same(loaded, state)
        assert loaded["decoder.weight"] is loaded["encoder.weight"]
        first, second = loaded["first"], loaded["second_t"]
        assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
        assert second.storage_offset() == 12
        assert second.stride() == (1, 3)
    with zipfile.ZipFile(path) as archive:
        assert sorted(n for n in archive.namelist() if "/data/" in n) == ["w/data/0", "w/data/1"]


def test_the_archive_is_what_torch_save_writes(tmp_path: Path) -> None:
    state = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.zeros(0)}
    ours, theirs = tmp_path / "ours.pt", tmp_path / "theirs.pt"
    _write(ours, state)
    torch.save(state, theirs)
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        assert a.testzip() is None
        assert [n.removeprefix("ours/") for n in a.namelist()] == [
            n.removeprefix("theirs/") for n in b.namelist()
        ]
        for name in a.namelist():
            short = name.removeprefix("ours/")
            if short not in {".data/serialization_id", "data.pkl"}:  # the pickle differs in memo slots only
                assert a.read(name) == b.read("theirs/" + short), short
            offset = a.getinfo(name).header_offset
            with ours.open("rb") as f:  # every record's data starts 64-byte aligned, as torch's do
                f.seek(offset + 26)
                lengths = f.read(4)
            name_len, extra_len = int.from_bytes(lengths[:2], "little"), int.from_bytes(lengths[2:], "little")
            assert (offset + 30 + name_len + extra_len) % 64 == 0


def test_the_pickle_matches_torch_for_a_state_dict() -> None:
    state = {f"layer{i}.weight": torch.randn(2, 3) for i in range(3)}
    state["tied"] = state["layer0.weight"]
    pickled, storages = pickle_state_dict(state)
    assert len(storages) == 3
    ops = [op.name for op, _, _ in pickletools.genops(pickled)]
    assert ops.count("BINPERSID") == 3
    assert ops[-1] == "STOP"
    ours = torch.load(io.BytesIO(_zip_of(pickled, storages)), weights_only=True)
    assert ours["tied"] is ours["layer0.weight"]


def _zip_of(pickled: bytes, storages: list[torch.UntypedStorage]) -> bytes:
    """A torch.save archive built with Python's zipfile from a pickle and its storages."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", b"little")
        for i, storage in enumerate(storages):
            archive.writestr(f"archive/data/{i}", bytes(storage))
        archive.writestr("archive/version", b"3\n")
    return out.getvalue()


def test_more_than_one_setitems_batch(tmp_path: Path) -> None:
    state = {f"t{i}": torch.full((2,), float(i)) for i in range(2500)}
    path = tmp_path / "many.pt"
    _write(path, state)
    _assert_same(torch.load(path, weights_only=True), state)
    _assert_same(load_torch_file(path), state)


def test_large_ints_in_shapes_and_offsets(tmp_path: Path) -> None:
    storage = torch.zeros(70_000, dtype=torch.uint8)
    state = {"offset": storage[66_000:], "strided": storage[::300]}  # BININT2 and BININT arguments
    path = tmp_path / "w.pt"
    _write(path, state)
    _assert_same(torch.load(path, weights_only=True), state)
    _assert_same(load_torch_file(path), state)


def test_extra_records_sit_beside_the_tensors(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    _write(path, {"a": torch.ones(2)}, records={"extra/note.txt": b"hello"})
    with zipfile.ZipFile(path) as archive:
        assert archive.read("w/extra/note.txt") == b"hello"
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))


def test_lazy_bits_and_gradients_are_stored_as_values(tmp_path: Path) -> None:
    c = torch.randn(3, dtype=torch.complex64)
    state = {"conj": c.conj(), "neg": c.conj().imag, "grad": torch.ones(2, requires_grad=True)}
    path = tmp_path / "w.pt"
    _write(path, state)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["conj"], c.conj().resolve_conj())
    assert torch.equal(loaded["neg"], c.conj().imag.resolve_neg())
    assert loaded["grad"].requires_grad


def test_save_weights_pt_round_trip_with_metadata(tmp_path: Path) -> None:
    state = {"w": torch.randn(3, 3), "b": torch.zeros(3), "step": torch.tensor(7)}
    state["w_tied"] = state["w"]
    path = torchkeep.save_weights(state, tmp_path / "model.pt", metadata={"dataset": "digits"})
    assert torchkeep.read_metadata(path) == {"dataset": "digits"}
    loaded = torch.load(path, weights_only=True)
    _assert_same(loaded, state)
    assert loaded["w_tied"] is loaded["w"]
    ours = torchkeep.load_weights(path)
    _assert_same(ours, state)
    assert ours["w_tied"] is ours["w"]
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist()[0] == "model/data.pkl"


def test_mixed_dtypes_on_one_storage_are_refused(tmp_path: Path) -> None:
    base = torch.zeros(8, dtype=torch.float32)
    with pytest.raises(ValueError, match="clone"):
        pickle_state_dict({"a": base, "b": base.view(torch.int32)})


def test_archive_root_is_the_name_to_the_first_dot() -> None:
    assert archive_root("/x/model.pt") == "model"
    assert archive_root("/x/model.tar.gz") == "model"
    assert archive_root(".pt") == "archive"


def test_quantized_tensors_go_through_torch_save_with_the_records(tmp_path: Path) -> None:
    with warnings.catch_warnings():  # torch warns of the deprecation once per process, if at all here
        warnings.filterwarnings("ignore", "(?s).*deprecated", UserWarning)
        q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    path = tmp_path / "q.pt"
    save_torch_zip(path, {"q": q, "w": torch.ones(2)}, records={"extra/note.txt": b"hi"})
    with zipfile.ZipFile(path) as archive:
        assert archive.read("q/extra/note.txt") == b"hi"
    with warnings.catch_warnings():  # torch's own quantized reader warns, once per process
        warnings.filterwarnings("ignore", "(?s).*TypedStorage is deprecated", UserWarning)
        loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["q"].dequantize(), q.dequantize())


def test_a_save_of_many_tensors_holds_no_per_tensor_objects_to_the_end(tmp_path: Path) -> None:
    state = {f"layer{i}.weight": torch.full((4,), float(i)) for i in range(10_000)}
    for t in state.values():
        t.untyped_storage()  # torch keeps the storage object it makes once per storage: not the writer's
    path = tmp_path / "many.pt"
    tracemalloc.start()
    try:
        _write(path, state)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # holding a view, a header and a directory entry per tensor to the end peaked at ~15.6 MiB here
    assert peak < 9 << 20, f"{peak / 2**20:.1f} MiB"
    with zipfile.ZipFile(path) as archive:
        assert len(archive.namelist()) == 10_000 + 6
        assert archive.read("many/data/9999") == bytes(state["layer9999.weight"].untyped_storage())


def test_the_pickle_and_the_directory_written_in_many_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torchkeep.storage.torchzip, "_PICKLE_CHUNK", 300)
    monkeypatch.setattr(torchkeep.storage.torchzip, "_GROUP_RECORDS", 7)
    state = {f"t{i}": torch.full((i % 3,), float(i)) for i in range(2500)}
    state["tied"] = state["t4"]
    path = tmp_path / "w.pt"
    assert _write(path, state, records={"extra/note.txt": b"hi"}) == path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert archive.read("w/extra/note.txt") == b"hi"
    for loaded in (torch.load(path, weights_only=True), load_torch_file(path)):
        _assert_same(loaded, state)
        assert loaded["tied"] is loaded["t4"]


def test_an_empty_tensor_met_twice_is_one_object_and_one_record(tmp_path: Path) -> None:
    empty, other = torch.zeros(0), torch.zeros(0, 2)
    state = {"a": empty, "b": other, "c": empty, "d": torch.ones(2)}
    path = tmp_path / "w.pt"
    _write(path, state)
    for loaded in (torch.load(path, weights_only=True), load_torch_file(path)):
        _assert_same(loaded, state)
        assert loaded["c"] is loaded["a"]
    with zipfile.ZipFile(path) as archive:
        assert sorted(n for n in archive.namelist() if "/data/" in n) == ["w/data/0", "w/data/1", "w/data/2"]


def test_mixed_dtypes_on_one_storage_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    base = torch.zeros(8, dtype=torch.float32)
    path = tmp_path / "w.pt"
    with pytest.raises(ValueError, match="clone"):
        _write(path, {"a": base, "b": base.view(torch.int32)})
    assert path.stat().st_size == 0

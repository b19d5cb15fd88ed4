"""The one-pass safetensors writer: standard files, every dtype, digests in parallel, split writes."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import torchkeep
from conftest import STORABLE_DTYPES
from torchkeep.storage import tensorfile
from torchkeep.storage.manifest import file_record
from torchkeep.storage.tensorfile import write_safetensors


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    source = torch.randn(5, 7, generator=g) * 10
    state = {f"t_{str(d).removeprefix('torch.')}": source.to(d) for d in STORABLE_DTYPES}
    state["scalar"] = torch.tensor(2.5)
    state["empty"] = torch.empty(0, 4)
    state["big"] = torch.randn(300_000, generator=g)
    return state


def _write(path: Path, state: dict[str, torch.Tensor], **kwargs: Any) -> tensorfile.WriteResult:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return write_safetensors(fd, state, {"who": "test"}, **kwargs)
    finally:
        os.close(fd)


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key].reshape(-1).view(torch.uint8), b[key].reshape(-1).view(torch.uint8)), key


def test_files_are_standard_safetensors_for_every_dtype(tmp_path: Path) -> None:
    state = _state()
    result = _write(tmp_path / "w.safetensors", state)
    assert result.size == (tmp_path / "w.safetensors").stat().st_size
    _assert_bitwise(load_file(str(tmp_path / "w.safetensors")), state)  # the reference reader
    header = torchkeep.formats.read_safetensors_header(tmp_path / "w.safetensors")  # our strict checks
    assert header.metadata == {"who": "test"}


def test_data_is_aligned_to_each_item_size(tmp_path: Path) -> None:
    _write(tmp_path / "w.safetensors", _state())
    raw = (tmp_path / "w.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0
    import json

    for name, entry in json.loads(raw[8 : 8 + header_len]).items():
        if name != "__metadata__":
            itemsize = _state()[name].element_size()
            assert entry["data_offsets"][0] % itemsize == 0, name


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_the_digest_is_computed_while_writing(tmp_path: Path, algorithm: str) -> None:
    result = _write(tmp_path / "w.safetensors", _state(), digest=algorithm, fsync=True)
    assert result.digest == file_record(tmp_path / "w.safetensors", algorithm).digest
    if algorithm == "sha256":
        assert result.digest == hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()


def test_writes_split_by_size_and_iovec_count_still_write_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tensorfile, "_MAX_WRITE", 4096)
    monkeypatch.setattr(tensorfile, "_IOV_MAX", 3)
    state = _state()
    result = _write(tmp_path / "w.safetensors", state, digest="sha256")
    _assert_bitwise(load_file(str(tmp_path / "w.safetensors")), state)
    assert result.digest == hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()


def test_partial_writes_are_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_writev = os.writev

    def short_writev(fd: int, buffers: list[memoryview]) -> int:  # the kernel may write less than asked
        first = buffers[0]
        return real_writev(fd, [first[: max(1, len(first) // 2)]])

    monkeypatch.setattr(os, "writev", short_writev)
    state = {"a": torch.arange(1000.0), "b": torch.ones(3, dtype=torch.int8)}
    _write(tmp_path / "w.safetensors", state)
    _assert_bitwise(load_file(str(tmp_path / "w.safetensors")), state)


def test_save_weights_uses_it_and_keeps_tied_weights(tmp_path: Path) -> None:
    from conftest import TiedNet

    model = TiedNet()
    torchkeep.save_weights(model, tmp_path / "t.safetensors")
    loaded = torchkeep.load_weights(tmp_path / "t.safetensors")
    assert loaded["out.weight"] is loaded["embed.weight"]
    assert torch.equal(loaded["embed.weight"], model.embed.weight)


@pytest.mark.parametrize("mmap", [True, False], ids=["lazy", "eager"])
def test_reading_equals_the_reference_reader(tmp_path: Path, mmap: bool) -> None:
    state = _state()
    _write(tmp_path / "w.safetensors", state)
    ours = torchkeep.load_weights(tmp_path / "w.safetensors", mmap=mmap)
    _assert_bitwise(ours, load_file(str(tmp_path / "w.safetensors")))
    for key, t in ours.items():  # each tensor owns a storage of exactly its size
        assert t.untyped_storage().nbytes() == t.nbytes, key


def test_a_lazy_load_never_writes_to_the_file(tmp_path: Path) -> None:
    torchkeep.save_weights({"w": torch.zeros(1000)}, tmp_path / "w.safetensors")
    loaded = torchkeep.load_weights(tmp_path / "w.safetensors", mmap=True)
    loaded["w"].fill_(5.0)
    assert torch.equal(torchkeep.load_weights(tmp_path / "w.safetensors")["w"], torch.zeros(1000))


def test_reading_checks_the_byte_limit_first(tmp_path: Path) -> None:
    torchkeep.save_weights({"w": torch.zeros(1000)}, tmp_path / "w.safetensors")
    with pytest.raises(torchkeep.LimitExceededError, match="max_bytes"):
        torchkeep.load_weights(tmp_path / "w.safetensors", limits=torchkeep.Limits(max_bytes=100))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("mmap", [True, False], ids=["lazy", "eager"])
def test_loading_straight_to_another_dtype(tmp_path: Path, suffix: str, mmap: bool) -> None:
    from conftest import TiedNet

    model = TiedNet()
    state = {**model.state_dict(), "steps": torch.arange(3), "mask": torch.ones(2, dtype=torch.bool)}
    torchkeep.save_weights(state, tmp_path / f"w{suffix}")
    loaded = torchkeep.load_weights(tmp_path / f"w{suffix}", dtype=torch.bfloat16, mmap=mmap)
    assert loaded["embed.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["embed.weight"], model.embed.weight.detach().to(torch.bfloat16))
    assert loaded["out.weight"] is loaded["embed.weight"]  # still tied
    assert loaded["steps"].dtype == torch.int64
    assert loaded["mask"].dtype == torch.bool


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e5m2]
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_writer_names_non_finite_tensors_as_it_hashes(
    tmp_path: Path, dtype: torch.dtype, bad: float
) -> None:
    tensors = {
        "clean": torch.ones(1000, dtype=dtype),
        "bad": torch.zeros(4096, dtype=dtype),
        "ids": torch.arange(3),
    }
    tensors["bad"][4000] = bad
    fd = os.open(tmp_path / "t.safetensors", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        result = write_safetensors(fd, tensors, digest="xxh3_128", check_finite=True)
    finally:
        os.close(fd)
    assert result.nonfinite == ["bad"]
    assert result.digest == file_record(tmp_path / "t.safetensors").digest


# -- the header, written piece by piece --------------------------------------------------------------


def test_the_header_is_what_json_dumps_writes_for_any_name(tmp_path: Path) -> None:
    names = ["plain.weight", 'quote"d', "back\\slash", "ünï", "tab\tname", "\x7f", "~[]{}"]
    state = {name: torch.full((2, i + 1), float(i)) for i, name in enumerate(names)}
    header, _ = tensorfile.safetensors_layout(state, {"k": 'v"'})
    table: dict[str, Any] = {"__metadata__": {"k": 'v"'}}
    offset = 0
    for name, t in state.items():
        table[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    expected = json.dumps(table, separators=(",", ":"), ensure_ascii=False).encode()
    assert header[8:].rstrip(b" ") == expected
    _write(tmp_path / "w.safetensors", state)
    _assert_bitwise(load_file(str(tmp_path / "w.safetensors")), state)


# -- write_chosen: deciding while writing ------------------------------------------------------------


def _chosen(
    path: Path, tensors: list[torch.Tensor], pick: Callable[[int, torch.Tensor], str | None], **kwargs: Any
) -> tuple[tensorfile.ChosenWrite, list[int]]:
    opened: list[int] = []

    def open_fd() -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        opened.append(fd)
        return fd

    try:
        return tensorfile.write_chosen(
            open_fd, tensors, pick, {"who": "test"}, name_length=32, **kwargs
        ), opened
    finally:
        for fd in opened:
            os.close(fd)


def _name(i: int) -> str:
    return f"{i:032x}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    picks=st.lists(st.booleans(), min_size=1, max_size=12),
    sizes=st.lists(st.integers(0, 3000), min_size=12, max_size=12),
    dtypes=st.lists(st.sampled_from(STORABLE_DTYPES), min_size=12, max_size=12),
    batch=st.sampled_from([1, 5000, 8 << 20]),  # bytes chosen before the first write
)
def test_write_chosen_writes_exactly_the_chosen_tensors(
    tmp_path: Path, picks: list[bool], sizes: list[int], dtypes: list[torch.dtype], batch: int
) -> None:
    g = torch.Generator().manual_seed(len(picks))
    tensors = [(torch.randn(sizes[i], generator=g) * 50).to(dtypes[i]) for i in range(len(picks))]
    path = tmp_path / "chosen.safetensors"
    path.unlink(missing_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tensorfile, "_HASH_BATCH", batch)
        written, opened = _chosen(
            path, tensors, lambda i, t: _name(i) if picks[i] else None, digest="xxh3_128"
        )
    assert written.names == [_name(i) if p else None for i, p in enumerate(picks)]
    if not any(picks):
        assert written.result is None
        assert not opened
        assert not path.exists()
        return
    assert written.result is not None
    assert len(opened) == 1
    assert written.result.size == path.stat().st_size
    assert written.result.digest == file_record(path).digest  # hashed from memory = the file's bytes
    expected = {_name(i): t for i, t in enumerate(tensors) if picks[i]}
    _assert_bitwise(load_file(str(path)), expected)  # the reference reader
    header = torchkeep.formats.read_safetensors_header(path)  # our strict one: ranges tile the data
    assert header.metadata == {"who": "test"}
    assert header.data_start % 8 == 0


def test_write_chosen_keeps_room_for_undecided_candidates_only_once_it_writes_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tensorfile, "_HASH_BATCH", 100_000)  # writing starts after 100 kB chosen
    tensors = [torch.randn(10_000) for _ in range(50)]  # 40 kB each

    def header_of(path: Path) -> tuple[bytes, int]:
        raw = path.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        return raw[8 : 8 + length], length

    few, _ = _chosen(tmp_path / "few.safetensors", tensors, lambda i, t: _name(i) if i in (7, 9) else None)
    text, length = header_of(tmp_path / "few.safetensors")  # decided before any write: exact size
    assert len(text.rstrip(b" ")) > length - 8
    assert few.result is not None
    assert few.result.size == 8 + length + 2 * tensors[7].nbytes
    many, _ = _chosen(tmp_path / "many.safetensors", tensors, lambda i, t: _name(i) if i % 2 else None)
    text, length = header_of(tmp_path / "many.safetensors")  # written early: room for the rest
    assert text.rstrip(b" ").endswith(b"}")
    assert len(text) - len(text.rstrip(b" ")) > 1000
    assert many.result is not None
    expected = {_name(i): t for i, t in enumerate(tensors) if i % 2}
    _assert_bitwise(load_file(str(tmp_path / "many.safetensors")), expected)
    assert many.result.digest is None


def test_write_chosen_checks_only_the_chosen_candidates_it_is_asked_to(tmp_path: Path) -> None:
    tensors = [torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")]), torch.tensor([float("nan")])]
    written, _ = _chosen(
        tmp_path / "c.safetensors", tensors, lambda i, t: None if i == 2 else _name(i), check_finite=[0, 2]
    )
    assert written.result is not None
    assert written.result.nonfinite == [_name(0)]


@pytest.mark.parametrize("bad", ["short", "0" * 31 + '"', "dup"])
def test_write_chosen_refuses_names_it_cannot_place(tmp_path: Path, bad: str) -> None:
    tensors = [torch.ones(3), torch.ones(3)]

    def pick(i: int, t: torch.Tensor) -> str:
        return _name(0) if bad == "dup" else bad

    with pytest.raises(ValueError, match="not a new name of 32 plain char"):
        _chosen(tmp_path / "c.safetensors", tensors, pick)


def _no_threads_left() -> bool:
    return not any(t.name in ("torchkeep-write", "torchkeep-prepare") for t in threading.enumerate())


@pytest.mark.parametrize("batch", [1, 8 << 20])  # the writer thread writing already, or not started
def test_an_error_while_choosing_reaches_the_caller_after_the_threads_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    monkeypatch.setattr(tensorfile, "_HASH_BATCH", batch)

    def pick(i: int, t: torch.Tensor) -> str:
        if i == 3:
            raise KeyError("the index broke")
        return _name(i)

    with pytest.raises(KeyError, match="the index broke"):
        _chosen(tmp_path / "c.safetensors", [torch.ones(4) for _ in range(6)], pick)
    assert _no_threads_left()


@pytest.mark.parametrize("batch", [1, 8 << 20])
def test_an_error_of_the_writes_reaches_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    monkeypatch.setattr(tensorfile, "_HASH_BATCH", batch)
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)  # writes to it fail
    try:
        with pytest.raises(OSError, match="Bad file descriptor"):
            tensorfile.write_chosen(
                lambda: fd, [torch.ones(4) for _ in range(6)], lambda i, t: _name(i), name_length=32
            )
    finally:
        os.close(fd)
    assert _no_threads_left()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=40),
    unprepared=st.none() | st.sets(st.integers(0, 39)),
    shared_min=st.sampled_from([0, 100, 1 << 30]),  # every candidate, some, none for the helper
    helpers=st.sampled_from([0, 1]),
    fail=st.none() | st.integers(0, 39),
)
def test_prepare_runs_once_for_each_candidate_before_it_is_chosen(
    tmp_path: Path,
    sizes: list[int],
    unprepared: set[int] | None,
    shared_min: int,
    helpers: int,
    fail: int | None,
) -> None:
    tensors = [torch.full((n,), float(i)) for i, n in enumerate(sizes)]
    wanted = set(range(len(tensors))) if unprepared is None else unprepared & set(range(len(tensors)))
    prepared: list[int] = []
    lock = threading.Lock()

    def prepare(i: int, t: torch.Tensor) -> None:
        assert t is tensors[i]
        if i == fail:
            raise KeyError(f"cannot prepare {i}")
        with lock:
            prepared.append(i)

    def pick(i: int, t: torch.Tensor) -> str | None:
        assert (i in prepared) == (i in wanted)  # prepared before it is chosen, and only if asked
        return _name(i) if i % 3 else None

    path = tmp_path / "p.safetensors"
    path.unlink(missing_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tensorfile, "_SHARED_MIN", shared_min)
        patch.setattr(tensorfile, "_helpers", lambda: helpers)
        if fail is not None and fail in wanted:
            with pytest.raises(KeyError, match=f"cannot prepare {fail}"):
                _chosen(path, tensors, pick, prepare=prepare, unprepared=unprepared)
            assert _no_threads_left()
            return
        written, _ = _chosen(path, tensors, pick, prepare=prepare, unprepared=unprepared)
    assert sorted(prepared) == sorted(wanted)  # each once
    assert _no_threads_left()
    expected = {_name(i): t for i, t in enumerate(tensors) if i % 3}
    if expected:
        _assert_bitwise(load_file(str(path)), expected)
    else:
        assert written.result is None


def test_large_candidates_are_prepared_on_two_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tensorfile, "_helpers", lambda: 1)  # as on a machine with two CPUs
    tensors = [torch.zeros(1 << 17) for _ in range(8)]  # 512 KiB each: shared with the helper
    threads: dict[int, str] = {}
    inside = {"caller": threading.Event(), "helper": threading.Event()}

    def prepare(i: int, t: torch.Tensor) -> None:  # each side's first waits until the other is in one
        threads[i] = threading.current_thread().name
        me, other = ("helper", "caller") if threads[i] == "torchkeep-prepare" else ("caller", "helper")
        inside[me].set()
        assert inside[other].wait(timeout=60)

    written, _ = _chosen(tmp_path / "t.safetensors", tensors, lambda i, t: None, prepare=prepare)
    assert written.result is None
    assert sorted(threads) == list(range(8))
    assert threads[0] == threading.current_thread().name  # the caller works from the front
    assert threads[7] == "torchkeep-prepare"  # the helper from the end of the order


@pytest.mark.parametrize("size", [0, 1, 4096, (8 << 20) + 13])
@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_a_mapped_file_record_equals_a_read_one(tmp_path: Path, size: int, algorithm: str) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(size))
    read, mapped = file_record(path, algorithm), file_record(path, algorithm, mapped=True)
    assert mapped == read
    assert read.size == size
    if algorithm == "sha256":
        assert read.digest == hashlib.sha256(path.read_bytes()).hexdigest()

"""The one-pass safetensors writer: standard files, every dtype, digests in parallel, split writes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import torch
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

"""save_weights / load_weights: round trips, interop with torch and safetensors, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import torchkeep
from conftest import TiedNet, assert_state_equal, rewrite_as_saved_on_gpu
from torchkeep.tutorial import TheModelClass

SUFFIXES = [".safetensors", ".pt", ".pth", ".bin"]
DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.complex64,
]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so every dtype (float8 too) compares bit for bit."""
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.detach().reshape(-1))
    return flat.view(torch.uint8)


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    base_shape = [*shape[:-1], shape[-1] + 2] if shape else []
    if dtype == torch.bool:
        t = torch.randint(0, 2, base_shape, generator=g).bool()
    elif dtype.is_floating_point or dtype.is_complex:
        t = (torch.randn(base_shape, generator=g) * 3).to(dtype)
    else:
        t = torch.randint(0, 100, base_shape, generator=g).to(dtype)
    form = draw(st.sampled_from(["whole", "slice", "transposed"]))
    if shape and form == "slice":
        t = t[..., 1 : 1 + shape[-1]]  # a view into a bigger storage, with an offset
    elif shape:
        t = t[..., : shape[-1]]
        if form == "transposed" and t.dim() >= 2:
            t = t.transpose(0, -1)  # non-contiguous
    return t


@given(
    state=st.dictionaries(st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True), tensors(), max_size=5),
    suffix=st.sampled_from(SUFFIXES),
)
def test_round_trip_is_bitwise_exact(tmp_path: Path, state: dict[str, torch.Tensor], suffix: str) -> None:
    path = tmp_path / f"w{suffix}"
    torchkeep.save_weights(state, path)
    loaded = torchkeep.load_weights(path)
    assert sorted(loaded) == sorted(state)
    for key, tensor in state.items():
        assert_bitwise_equal(loaded[key], tensor)
        assert loaded[key].is_contiguous()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_model_weights_include_buffers(tmp_path: Path, model: TheModelClass, suffix: str) -> None:
    path = torchkeep.save_weights(model, tmp_path / f"model{suffix}")
    loaded = torchkeep.load_weights(path)
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= set(loaded)
    assert_state_equal(loaded, dict(model.state_dict()))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_files_read_with_plain_torch_load(tmp_path: Path, model: TheModelClass, suffix: str) -> None:
    path = torchkeep.save_weights(model, tmp_path / f"model{suffix}", metadata={"note": "x"})
    plain = torch.load(path, weights_only=True)
    assert type(plain) is dict
    assert_state_equal(plain, dict(model.state_dict()))
    fresh = TheModelClass()
    fresh.load_state_dict(plain)


def test_safetensors_files_read_with_safetensors_library(tmp_path: Path, model: TheModelClass) -> None:
    path = torchkeep.save_weights(model, tmp_path / "model.safetensors")
    assert_state_equal(load_file(str(path)), dict(model.state_dict()))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_tied_weights_are_stored_once_and_come_back_tied(tmp_path: Path, suffix: str) -> None:
    net = TiedNet()
    path = torchkeep.save_weights(net, tmp_path / f"tied{suffix}")
    loaded = torchkeep.load_weights(path)
    assert torch.equal(loaded["embed.weight"], net.embed.weight.detach())
    assert loaded["out.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    untied = torchkeep.save_weights(
        {k: v.clone() for k, v in net.state_dict().items()}, tmp_path / f"u{suffix}"
    )
    assert path.stat().st_size < untied.stat().st_size


def test_overlapping_views_are_saved_as_separate_exact_copies(tmp_path: Path) -> None:
    base = torch.arange(20.0)
    state = {"first": base[:12], "second": base[8:], "whole": base}
    torchkeep.save_weights(state, tmp_path / "v.safetensors")
    loaded = torchkeep.load_weights(tmp_path / "v.safetensors")
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor)


def test_a_slice_of_a_big_tensor_saves_only_the_slice(tmp_path: Path) -> None:
    big = torch.zeros(1_000_000)
    torchkeep.save_weights({"small": big[:10]}, tmp_path / "s.pt")
    assert (tmp_path / "s.pt").stat().st_size < 10_000


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_dtype_casts_floats_only(tmp_path: Path, suffix: str) -> None:
    state = {"w": torch.randn(3, 3), "steps": torch.tensor(7), "mask": torch.tensor([True, False])}
    torchkeep.save_weights(state, tmp_path / f"h{suffix}", dtype=torch.bfloat16)
    loaded = torchkeep.load_weights(tmp_path / f"h{suffix}")
    assert loaded["w"].dtype == torch.bfloat16
    assert torch.equal(loaded["w"], state["w"].to(torch.bfloat16))
    assert loaded["steps"].dtype == torch.int64
    assert loaded["mask"].dtype == torch.bool


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_metadata_round_trip(tmp_path: Path, suffix: str) -> None:
    path = torchkeep.save_weights(
        {"a": torch.ones(2)}, tmp_path / f"m{suffix}", metadata={"dataset": "digits"}
    )
    assert torchkeep.read_metadata(path)["dataset"] == "digits"
    assert torchkeep.summarize(path).metadata["dataset"] == "digits"


def test_safetensors_files_carry_format_pt_for_other_tools(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = torchkeep.save_weights({"a": torch.ones(2)}, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "pt"


@pytest.mark.parametrize("metadata", [{"n": 1}, {1: "x"}, {"torchkeep.aliases": "{}"}, ["a"]])
def test_bad_metadata_is_refused_before_writing(tmp_path: Path, metadata: object) -> None:
    with pytest.raises(torchkeep.InvalidMetadataError, match="str"):
        torchkeep.save_weights({"a": torch.ones(1)}, tmp_path / "m.safetensors", metadata=metadata)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "expected_key"),
    [
        ("state_dict", "state_dict"),
        ("model_state_dict", "model_state_dict"),
        ("model", "model"),
    ],
)
def test_finds_the_state_dict_inside_checkpoint_dicts(
    tmp_path: Path, model: TheModelClass, content: str, expected_key: str
) -> None:
    torch.save({"epoch": 3, content: model.state_dict(), "loss": 0.5}, tmp_path / "c.pt")
    assert_state_equal(torchkeep.load_weights(tmp_path / "c.pt"), dict(model.state_dict()))


def test_key_picks_an_entry(tmp_path: Path, model: TheModelClass) -> None:
    torch.save({"ema": model.state_dict(), "step": 1}, tmp_path / "c.pt")
    with pytest.raises(torchkeep.NotAStateDictError, match="key=") as info:
        torchkeep.load_weights(tmp_path / "c.pt")
    assert info.value.keys == ("ema", "step")
    assert_state_equal(torchkeep.load_weights(tmp_path / "c.pt", key="ema"), dict(model.state_dict()))
    with pytest.raises(torchkeep.NotAStateDictError, match="no entry 'nope'"):
        torchkeep.load_weights(tmp_path / "c.pt", key="nope")


def test_reads_hugging_face_pytorch_model_bin(tmp_path: Path) -> None:
    # HF writes a bare state dict (OrderedDict) with torch.save to pytorch_model.bin
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16)
    torch.save(layer.state_dict(), tmp_path / "pytorch_model.bin")
    assert_state_equal(torchkeep.load_weights(tmp_path / "pytorch_model.bin"), dict(layer.state_dict()))


def test_reads_the_legacy_non_zip_format(tmp_path: Path, model: TheModelClass) -> None:
    torch.save(model.state_dict(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert torchkeep.detect_format(tmp_path / "old.pt") is torchkeep.FileFormat.TORCH_LEGACY
    assert_state_equal(torchkeep.load_weights(tmp_path / "old.pt"), dict(model.state_dict()))


def test_file_saved_on_a_gpu_loads_on_this_cpu(tmp_path: Path, model: TheModelClass) -> None:
    torch.save(model.state_dict(), tmp_path / "cpu.pt")
    rewrite_as_saved_on_gpu(tmp_path / "cpu.pt", tmp_path / "gpu.pt")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pt", weights_only=True)  # what plain torch does here
    loaded = torchkeep.load_weights(tmp_path / "gpu.pt")
    assert all(t.device.type == "cpu" for t in loaded.values())
    assert_state_equal(loaded, dict(model.state_dict()))


def test_reads_the_weights_of_an_exported_program(tmp_path: Path, model: TheModelClass) -> None:
    torchkeep.save_model(model, tmp_path / "m.pt2", example_inputs=(torch.randn(2, 3, 26, 26),))
    loaded = torchkeep.load_weights(tmp_path / "m.pt2")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_never_unpickles_arbitrary_objects(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = f"""
import os, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
torch.save({{"w": torch.ones(1), "x": Payload()}}, {str(tmp_path / "evil.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    with pytest.raises(torchkeep.UntrustedFileError) as info:
        torchkeep.load_weights(tmp_path / "evil.pt")
    assert "posix.system" in info.value.globals or "os.system" in info.value.globals
    assert not marker.exists()


def test_numpy_values_need_trust_and_trust_reads_them(tmp_path: Path, model: TheModelClass) -> None:
    # old checkpoints often hold numpy scalars, which weights_only refuses
    import numpy as np

    torch.save({"model_state_dict": model.state_dict(), "loss": np.float64(0.5)}, tmp_path / "old.tar")
    with pytest.raises(torchkeep.UntrustedFileError, match="trust=True") as info:
        torchkeep.load_weights(tmp_path / "old.tar")
    assert any(name.startswith("numpy") for name in info.value.globals)
    assert_state_equal(torchkeep.load_weights(tmp_path / "old.tar", trust=True), dict(model.state_dict()))


def test_trust_reads_the_weights_of_a_pickled_model(tmp_path: Path, model: TheModelClass) -> None:
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(torchkeep.UntrustedFileError):
        torchkeep.load_weights(tmp_path / "whole.pt")
    assert_state_equal(torchkeep.load_weights(tmp_path / "whole.pt", trust=True), dict(model.state_dict()))


# -- bad input ------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(torchkeep.ModelFileNotFoundError, match="no such file") as info:
        torchkeep.load_weights(tmp_path / "model.pt")
    assert isinstance(info.value, FileNotFoundError)
    assert "model.safetensors" in str(info.value)  # points at the file that is there


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.PathIsDirectoryError, match="directory"):
        torchkeep.load_weights(tmp_path)
    with pytest.raises(IsADirectoryError):
        torchkeep.save_weights({"a": torch.ones(1)}, _mkdir(tmp_path / "d.pt"))


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(torchkeep.CorruptFileError, match="empty"):
        torchkeep.load_weights(tmp_path / "e.pt")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_file(tmp_path: Path, model: TheModelClass, suffix: str, keep: float) -> None:
    path = torchkeep.save_weights(model, tmp_path / f"m{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(torchkeep.CorruptFileError) as info:
        torchkeep.load_weights(path)
    assert isinstance(info.value, ValueError)
    assert "re-create" in str(info.value)


@pytest.mark.parametrize(
    ("content", "described"),
    [
        (b"hello, these are not weights\n", "text file"),
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "PNG image"),
        (b"\xff\xd8\xff\xe0" + bytes(100), "JPEG image"),
        (b'{"a": 1}', "JSON"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "Git LFS pointer"),
    ],
)
def test_not_a_model_file(tmp_path: Path, content: bytes, described: str) -> None:
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(torchkeep.UnknownFormatError, match=described) as info:
        torchkeep.load_weights(tmp_path / "x.pt")
    assert "safetensors" in str(info.value)  # says what would work


@pytest.mark.parametrize(
    "header",
    [
        b"{not json",
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}',  # 8 bytes needed, 4 claimed
        b'{"a": {"dtype": "XX", "shape": [1], "data_offsets": [0, 4]}}',
        b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}',
        b'{"__metadata__": {"k": 1}}',
    ],
)
def test_safetensors_with_a_corrupt_header(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(torchkeep.CorruptFileError):
        torchkeep.load_weights(path)


def test_safetensors_header_longer_than_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10**6).to_bytes(8, "little") + b'{"a":')
    with pytest.raises(torchkeep.CorruptFileError, match="header claims"):
        torchkeep.load_weights(path)


@pytest.mark.parametrize(
    ("content", "found"),
    [
        ([torch.ones(1)], "list"),
        ({"epoch": 1, "loss": 0.3}, "dict of 2 entries"),
        (torch.ones(3), "single tensor"),
    ],
)
def test_pt_whose_content_is_not_a_state_dict(tmp_path: Path, content: object, found: str) -> None:
    torch.save(content, tmp_path / "x.pt")
    with pytest.raises(torchkeep.NotAStateDictError, match=found) as info:
        torchkeep.load_weights(tmp_path / "x.pt")
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("name", ["w.npz", "w", "w.onnx", "w.h5"])
def test_unknown_suffix_on_save(tmp_path: Path, name: str) -> None:
    with pytest.raises(torchkeep.UnsupportedSuffixError, match=r"\.safetensors") as info:
        torchkeep.save_weights({"a": torch.ones(1)}, tmp_path / name)
    assert ".pt" in info.value.supported
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_what_is_not_a_state_dict(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.NotAStateDictError, match="entry 'lr' is a float"):
        torchkeep.save_weights({"w": torch.ones(1), "lr": 0.1}, tmp_path / "w.pt")  # type: ignore[dict-item]
    with pytest.raises(torchkeep.NotAStateDictError, match="meta device"):
        torchkeep.save_weights({"w": torch.empty(2, device="meta")}, tmp_path / "w.pt")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_the_previous_file_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = torchkeep.save_weights({"a": torch.ones(3)}, tmp_path / "w.pt")
    before = path.read_bytes()

    def broken_write(fd: int, *args: object, **kwargs: object) -> int:
        os.write(fd, b"PK\x03\x04 half written")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torchkeep.storage.torchzip, "write_torch_zip", broken_write)
    with pytest.raises(OSError, match="No space"):
        torchkeep.save_weights({"a": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]  # no temp file left behind


@pytest.mark.parametrize("dtype", [torch.complex128, torch.float8_e8m0fnu])
def test_safetensors_refuses_a_dtype_it_cannot_store_before_writing(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    tensor = torch.ones(2).to(dtype)
    with pytest.raises(torchkeep.UnsupportedDtypeError, match=r"save to a \.pt file") as info:
        torchkeep.save_weights({"z": tensor}, tmp_path / "z.safetensors")
    assert info.value.key == "z"
    assert list(tmp_path.iterdir()) == []
    torchkeep.save_weights({"z": tensor}, tmp_path / "z.pt")
    assert_bitwise_equal(torchkeep.load_weights(tmp_path / "z.pt")["z"], tensor)


def test_a_killed_save_never_leaves_a_broken_file(tmp_path: Path) -> None:
    """Kill a process that rewrites a weights file in a loop; the file always loads whole."""
    path = tmp_path / "w.safetensors"
    script = f"""
import torch, torchkeep
i = 0
while True:
    torchkeep.save_weights({{"w": torch.full((2_000_000,), float(i))}}, {str(path)!r}, durable=False)
    i += 1
    print(i, flush=True)
"""
    for delay in (1.5, 2.0, 2.5):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one save is complete
        try:
            proc.wait(timeout=delay - 1.0)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
        proc.wait()
        proc.stdout.close()
        loaded = torchkeep.load_weights(path)["w"]
        assert torch.equal(loaded, torch.full((2_000_000,), loaded[0].item()))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "w.safetensors"]
    # a killed writer may leave hidden temp files (ours, or safetensors' own), never another visible file
    assert all(name.startswith(".") for name in leftovers), leftovers


def test_summary_metadata_of_pt_without_metadata(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(1)}, tmp_path / "plain.pt")
    assert torchkeep.read_metadata(tmp_path / "plain.pt") == {}
    assert json.loads(json.dumps(torchkeep.summarize(tmp_path / "plain.pt").to_dict()))["metadata"] == {}


def test_map_location_moves_tensors(tmp_path: Path) -> None:
    torchkeep.save_weights({"a": torch.ones(2)}, tmp_path / "a.safetensors")
    torchkeep.save_weights({"a": torch.ones(2)}, tmp_path / "a.pt")
    for name in ("a.safetensors", "a.pt"):
        assert (
            torchkeep.load_weights(tmp_path / name, map_location=torch.device("cpu"))["a"].device.type
            == "cpu"
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_cuda_tensors_save_as_device_free_data(tmp_path: Path, suffix: str) -> None:
    state = {"a": torch.randn(4, 4, device="cuda"), "b": torch.arange(3, device="cuda")}
    path = torchkeep.save_weights(state, tmp_path / f"g{suffix}")
    loaded = torchkeep.load_weights(path)
    for key, value in state.items():
        assert loaded[key].device.type == "cpu"
        assert torch.equal(loaded[key], value.cpu())
    on_gpu = torchkeep.load_weights(path, map_location="cuda")
    assert on_gpu["a"].device.type == "cuda"


def _aliased_safetensors(path: Path, aliases: str) -> Path:
    from safetensors.torch import save_file

    save_file(
        {"a": torch.ones(4), "b": torch.full((4,), -1.0)},
        str(path),
        metadata={"format": "pt", "torchkeep.aliases": aliases},
    )
    return path


def test_aliases_only_fill_in_keys_the_file_does_not_store(tmp_path: Path) -> None:
    path = _aliased_safetensors(tmp_path / "ok.safetensors", json.dumps({"c": "a"}))
    loaded = torchkeep.load_weights(path)
    assert sorted(loaded) == ["a", "b", "c"]
    assert loaded["c"] is loaded["a"]
    assert torch.equal(loaded["b"], torch.full((4,), -1.0))


@pytest.mark.parametrize(
    ("aliases", "reason"),
    [
        (json.dumps({"a": "b"}), "also stored"),  # would load b's values as a
        (json.dumps({"c": "d", "d": "a"}), "does not store"),  # chains
        (json.dumps({"c": "zzz"}), "does not store"),
        (json.dumps(["a"]), "not an object"),
        (json.dumps({"c": 5}), "not a key"),
        ('{"c": ', "not valid JSON"),
        ("[" * 100_000, "not valid JSON"),
        ('{"c": ' + "9" * 5000 + "}", "not valid JSON"),
    ],
)
def test_aliases_that_change_or_invent_tensors_are_corrupt(tmp_path: Path, aliases: str, reason: str) -> None:
    path = _aliased_safetensors(tmp_path / "bad.safetensors", aliases)
    with pytest.raises(torchkeep.CorruptFileError, match=reason):
        torchkeep.load_weights(path)


@pytest.mark.parametrize("record", [b"[1, 2]", b'{"a": 1}', b'{"a": ', b"9" * 5000])
def test_a_pt_metadata_record_that_is_not_str_to_str_is_corrupt(tmp_path: Path, record: bytes) -> None:
    import zipfile

    path = torchkeep.save_weights({"a": torch.ones(2)}, tmp_path / "m.pt", metadata={"k": "v"})
    assert isinstance(path, Path)
    with zipfile.ZipFile(path) as original:
        members = {n: original.read(n) for n in original.namelist()}
    name = next(n for n in members if n.endswith("extra/torchkeep_metadata.json"))
    members[name] = record
    with zipfile.ZipFile(path, "w") as rewritten:
        for n, data in members.items():
            rewritten.writestr(n, data)
    for read in (torchkeep.read_metadata, torchkeep.load_weights):
        with pytest.raises(torchkeep.CorruptFileError, match="metadata record"):
            read(path)
    assert torchkeep.scan(path).verdict == "CORRUPT"

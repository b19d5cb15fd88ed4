"""Format detection by content, and the strict safetensors header checks."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep.formats import FileFormat, detect_format, read_safetensors_header
from torchkeep.storage.atomic import atomic_target


def test_detects_each_format_whatever_the_suffix(tmp_path: Path, model: torch.nn.Module) -> None:
    torchkeep.save_weights(model, tmp_path / "a.safetensors")
    os.rename(tmp_path / "a.safetensors", tmp_path / "a.bin")
    torch.save(model.state_dict(), tmp_path / "b.bin")
    torch.save(model.state_dict(), tmp_path / "c.bin", _use_new_zipfile_serialization=False)
    torchkeep.save_model(model, tmp_path / "d.pt2", example_inputs=(torch.randn(2, 3, 26, 26),))
    assert detect_format(tmp_path / "a.bin") is FileFormat.SAFETENSORS
    assert detect_format(tmp_path / "b.bin") is FileFormat.TORCH_ZIP
    assert detect_format(tmp_path / "c.bin") is FileFormat.TORCH_LEGACY
    assert detect_format(tmp_path / "d.pt2") is FileFormat.TORCH_EXPORT


def test_a_zip_that_torch_did_not_write(tmp_path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(tmp_path / "x.pt", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(torchkeep.UnknownFormatError, match="zip archive that torch did not write"):
        detect_format(tmp_path / "x.pt")


def test_plain_pickle_is_named(tmp_path: Path) -> None:
    import pickle

    (tmp_path / "p.pt").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    # detection hands pickles to the allowlist reader, which names what it found
    assert detect_format(tmp_path / "p.pt") is FileFormat.PICKLE
    with pytest.raises(torchkeep.UnknownFormatError, match="plain pickle"):
        torchkeep.load_weights(tmp_path / "p.pt")


def test_header_lists_tensors_and_metadata(tmp_path: Path) -> None:
    path = torchkeep.save_weights(
        {"w": torch.zeros(2, 3, dtype=torch.bfloat16)}, tmp_path / "w.safetensors", metadata={"k": "v"}
    )
    header = read_safetensors_header(path)
    assert [(t.name, t.dtype, t.shape, t.nbytes) for t in header.tensors] == [
        ("w", "torch.bfloat16", (2, 3), 12)
    ]
    assert header.metadata["k"] == "v"


def test_atomic_target_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def crash_while_writing() -> None:
        with atomic_target(target) as tmp:
            tmp.write_bytes(b"new, half")
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        crash_while_writing()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    with atomic_target(tmp_path / "sub" / "g.bin") as tmp:
        tmp.write_bytes(b"new")
    assert (tmp_path / "sub" / "g.bin").read_bytes() == b"new"


def test_atomic_target_replaces_a_file_and_clears_what_a_killed_replace_left(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    (tmp_path / ".f.bin.old-dead").write_bytes(b"older")  # a second name a killed replace left
    (tmp_path / ".g.bin.old-dead").write_bytes(b"other")  # another target's: not ours to remove
    with atomic_target(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".g.bin.old-dead", "f.bin"]
    with atomic_target(tmp_path / "h.bin") as tmp:  # a new name
        tmp.write_bytes(b"first")
    assert (tmp_path / "h.bin").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".g.bin.old-dead", "f.bin", "h.bin"]


def _safetensors(path: Path, header: dict[str, object] | str, data: bytes) -> Path:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _f32(begin: int, n: int) -> dict[str, object]:
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, begin + 4 * n]}


def test_files_from_the_safetensors_library_pass_the_strict_checks(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {
        "a": torch.ones(3, dtype=torch.int8),  # odd sizes make the library pad and align
        "b": torch.ones(5, dtype=torch.float64),
        "c": torch.ones(0, 2),
        "d": torch.ones(2, dtype=torch.bfloat16),
    }
    save_file(tensors, tmp_path / "lib.safetensors", metadata={"who": "safetensors"})
    header = read_safetensors_header(tmp_path / "lib.safetensors")
    assert sorted(t.name for t in header.tensors) == ["a", "b", "c", "d"]
    assert header.metadata == {"who": "safetensors"}


@pytest.mark.parametrize(
    ("header", "data", "reason"),
    [
        ({"a": _f32(0, 2), "b": _f32(12, 1)}, bytes(16), "unexplained bytes"),  # a gap
        ({"a": _f32(0, 2), "b": _f32(4, 2)}, bytes(12), "overlaps"),
        ({"a": _f32(0, 2)}, bytes(12), "trailing data"),
        ({"a": _f32(0, 4)}, bytes(8), "truncated"),
        ({"a": _f32(0, 2), "__metadata__": {"k": 1}}, bytes(8), "mapping of strings"),
        ({"a\u0007b": _f32(0, 2)}, bytes(8), "control or invisible"),
        ({"a\u200bb": _f32(0, 2)}, bytes(8), "control or invisible"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), "invalid data offsets"),
        ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "claims 8 bytes"),
        (' {"a": 1}', b"", "does not start with"),
    ],
)
def test_safetensors_headers_that_are_refused(
    tmp_path: Path, header: object, data: bytes, reason: str
) -> None:
    path = _safetensors(
        tmp_path / "bad.safetensors",
        header if isinstance(header, str) else json.loads(json.dumps(header)),
        data,
    )
    with pytest.raises(torchkeep.CorruptFileError, match=reason):
        read_safetensors_header(path)


def test_safetensors_limits(tmp_path: Path) -> None:
    many = {f"t{i}": _f32(4 * i, 1) for i in range(5)} | {"__metadata__": {str(i): "v" for i in range(5)}}
    path = _safetensors(tmp_path / "m.safetensors", many, bytes(20))
    with pytest.raises(torchkeep.LimitExceededError, match="max_metadata"):
        read_safetensors_header(path, limits=torchkeep.Limits(max_metadata=3))
    with pytest.raises(torchkeep.LimitExceededError, match="max_header_bytes"):
        read_safetensors_header(path, limits=torchkeep.Limits(max_header_bytes=10))
    assert len(read_safetensors_header(path).tensors) == 5


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "link-and-replace"])
def test_replacing_a_file_is_atomic_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    from torchkeep.storage import atomic

    if not exchange:
        monkeypatch.setattr(atomic, "_renameat2", None)
    elif atomic._renameat2 is None:
        pytest.skip("this C library has no renameat2")
    target = tmp_path / "w.bin"
    target.write_bytes(b"old" * 1000)
    reader = target.open("rb")  # a reader that opened the old file keeps reading it
    old_inode = target.stat().st_ino
    with atomic_target(target) as tmp:
        tmp.write_bytes(b"new" * 2000)
    if exchange and atomic._renameat2 is None:
        pytest.skip("this filesystem refused RENAME_EXCHANGE (the fallback is the other case)")
    assert target.read_bytes() == b"new" * 2000
    assert target.stat().st_ino != old_inode
    assert reader.read() == b"old" * 1000
    reader.close()
    atomic.wait_for_discards()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin"]  # the old file is gone too

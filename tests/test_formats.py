"""Format detection by content and the pickle import listing."""

from __future__ import annotations

import os
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
    with pytest.raises(torchkeep.UnknownFormatError, match="plain pickle"):
        detect_format(tmp_path / "p.pt")


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

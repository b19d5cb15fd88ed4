"""The one sniffer: loaders, scan, summarize and the CLI get one answer from full structural checks.

The bug this guards against: a safetensors file whose 8-byte header length
has 0x80 as its low byte (1 in 32 real files, e.g. lengths 0x180, 0x280) was
taken for a pickle by one byte and refused by every loader.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import torchkeep
from torchkeep.formats import FileFormat, detect_format, sniff
from torchkeep.formats.pickles import runs_as_pickle

TENSORS = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.int64)}


def _header_length(path: Path) -> int:
    with path.open("rb") as f:
        return int(struct.unpack("<Q", f.read(8))[0])


def _library_file(path: Path, header_length: int) -> Path:
    """A file written by the safetensors library whose header is exactly ``header_length`` bytes."""
    save_file(TENSORS, path, metadata={"pad": ""})
    base = _header_length(path)
    with path.open("rb") as f:
        f.seek(8)
        unpadded = len(f.read(base).rstrip(b" "))
    extra = header_length - unpadded  # the library pads the JSON with spaces to a multiple of 8
    assert extra >= 0
    save_file(TENSORS, path, metadata={"pad": "a" * extra})
    assert _header_length(path) == header_length
    return path


def _assert_read_everywhere(path: Path) -> None:
    assert detect_format(path) is FileFormat.SAFETENSORS
    loaded = torchkeep.load_weights(path)
    assert set(loaded) == set(TENSORS)
    assert all(torch.equal(loaded[k], TENSORS[k]) for k in TENSORS)
    result = torchkeep.scan(path)
    assert (result.verdict, result.format) == ("SAFE", "safetensors"), result.reason
    assert {row.name for row in torchkeep.summarize(path).rows} == set(TENSORS)


# lengths whose first two bytes read as a pickle PROTO opcode (0x80, then 1..5): the bug's trigger
@pytest.mark.parametrize("length", [0x80 + 0x100 * j for j in range(1, 24)], ids=hex)
def test_library_files_whose_length_starts_like_a_pickle(tmp_path: Path, length: int) -> None:
    path = _library_file(tmp_path / "m.safetensors", length)
    with path.open("rb") as f:
        assert f.read(1) == b"\x80"
    _assert_read_everywhere(path)


def test_the_cli_reads_them_too(tmp_path: Path) -> None:
    path = _library_file(tmp_path / "m.safetensors", 0x280)
    proc = subprocess.run(
        [sys.executable, "-m", "torchkeep", "inspect", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert {t["name"] for t in json.loads(proc.stdout)["tensors"]} == set(TENSORS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(length=st.integers(min_value=256, max_value=6000).map(lambda n: n - n % 8))
def test_any_header_length_from_the_library(length: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _assert_read_everywhere(_library_file(Path(tmp) / "m.safetensors", length))


@settings(max_examples=80, deadline=None)
@given(length=st.integers(min_value=100, max_value=70000), low=st.sampled_from([None, 0x80]))
def test_any_header_length_padded_by_hand(length: int, low: int | None) -> None:
    # The spec allows any length and trailing spaces: not only the library's multiples of 8.
    if low is not None:
        length = (length & ~0xFF) | low | 0x100
    header = {
        "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "I64", "shape": [3], "data_offsets": [24, 48]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (length - len(raw))
    data = TENSORS["w"].numpy().tobytes() + TENSORS["b"].numpy().tobytes()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.bin"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        _assert_read_everywhere(path)


def test_a_truncated_file_whose_length_starts_like_a_pickle_is_called_damaged(tmp_path: Path) -> None:
    path = _library_file(tmp_path / "m.safetensors", 0x280)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:0x200])
    with pytest.raises(torchkeep.CorruptFileError, match="header claims") as err:
        torchkeep.load_weights(cut)
    assert "pickle" not in str(err.value)
    assert torchkeep.scan(cut).verdict == "CORRUPT"


def test_a_file_that_is_both_safetensors_and_a_pickle_that_acts_is_refused(tmp_path: Path) -> None:
    # Length 0x950280: its bytes read 80 02 95 (PROTO 2, FRAME) and the frame's length field swallows
    # the '{'; the JSON key then starts with 'R', a REDUCE opcode. Every reader refuses it the same way.
    length = 0x950280
    header = {"aR": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode()
    raw += b" " * (length - len(raw))
    path = tmp_path / "both.safetensors"
    path.write_bytes(struct.pack("<Q", length) + raw + bytes(4))
    with path.open("rb") as f:
        assert runs_as_pickle(f) is not None
    with pytest.raises(torchkeep.UnsafeFileError, match="also read as a pickle"):
        detect_format(path)
    with pytest.raises(torchkeep.UnsafeFileError):
        torchkeep.load_weights(path)
    assert torchkeep.scan(path).verdict == "UNSAFE"


def test_real_safetensors_bytes_never_act_as_a_pickle(tmp_path: Path) -> None:
    for length in (0x280, 0x380, 0x480, 0x580):
        with _library_file(tmp_path / f"{length}.safetensors", length).open("rb") as f:
            assert runs_as_pickle(f) is None


def test_pickles_and_legacy_files(tmp_path: Path) -> None:
    (tmp_path / "p.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    torch.save(TENSORS, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert detect_format(tmp_path / "p.pkl") is FileFormat.PICKLE
    assert detect_format(tmp_path / "old.pt") is FileFormat.TORCH_LEGACY
    with (tmp_path / "p.pkl").open("rb") as f:
        assert runs_as_pickle(f) == "a complete pickle"


def test_sniff_works_on_streams_as_on_files(tmp_path: Path) -> None:
    torch.save(TENSORS, tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    assert sniff(tmp_path / "w.pt", io.BytesIO(data), len(data)) is FileFormat.TORCH_ZIP


def test_an_archive_that_is_both_a_torch_file_and_a_program_is_refused(tmp_path: Path) -> None:
    torch.save(TENSORS, tmp_path / "w.pt")
    both = tmp_path / "both.pt"
    with zipfile.ZipFile(tmp_path / "w.pt") as src, zipfile.ZipFile(both, "w") as out:
        for name in src.namelist():
            out.writestr(name, src.read(name))
        out.writestr("w/archive_format", "pt2")
    with pytest.raises(torchkeep.UnsafeFileError, match=r"both a torch\.save archive"):
        detect_format(both)
    assert torchkeep.scan(both).verdict == "UNSAFE"


def _npy(shape_text: str, body: bytes) -> bytes:
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}".encode()
    header += b" " * (63 - len(header) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + body


@pytest.mark.parametrize("shape", ["(1,,4)", "(,)", "(1 2)", "(-1,)", "(1e3,)", "(" + "9" * 30 + ",)"])
def test_malformed_npy_shapes_are_corrupt_not_a_crash(tmp_path: Path, shape: str) -> None:
    path = tmp_path / "a.npy"
    path.write_bytes(_npy(shape, bytes(16)))
    result = torchkeep.scan(path)
    assert result.verdict == "CORRUPT", result.reason
    with pytest.raises(torchkeep.UnknownFormatError, match="NumPy"):
        torchkeep.load_weights(path)


def test_npy_files_from_numpy(tmp_path: Path) -> None:
    import numpy as np

    np.save(tmp_path / "a.npy", np.ones((2, 3), dtype=np.float32))
    np.save(tmp_path / "s.npy", np.ones((), dtype=np.int16))
    for name in ("a.npy", "s.npy"):
        result = torchkeep.scan(tmp_path / name)
        assert (result.verdict, result.format) == ("SAFE", "numpy .npy"), result.reason


@pytest.mark.parametrize("number", ["9" * 5000, "-" + "9" * 25, "NaN", "Infinity"])
def test_absurd_numbers_in_a_header_are_corrupt(tmp_path: Path, number: str) -> None:
    raw = ('{"w": {"dtype": "F32", "shape": [' + number + '], "data_offsets": [0, 4]}}').encode()
    path = tmp_path / "n.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(torchkeep.CorruptFileError):
        torchkeep.load_weights(path)
    assert torchkeep.scan(path).verdict == "CORRUPT"

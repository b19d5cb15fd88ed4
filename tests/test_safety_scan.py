"""scan() and ``torchkeep scan``: verdicts per format, findings with member and offset, exit codes."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import torchkeep
from test_cli import run_cli
from torchkeep.tutorial import TheModelClass


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("true",))


@pytest.fixture
def files(tmp_path: Path, model: TheModelClass) -> dict[str, Path]:
    out = {
        "pt": tmp_path / "w.pt",
        "legacy": tmp_path / "old.pth",
        "safetensors": tmp_path / "w.safetensors",
        "pkl": tmp_path / "plain.pkl",
        "npy": tmp_path / "a.npy",
        "npz": tmp_path / "b.npz",
        "pt2": tmp_path / "m.pt2",
        "evil_pt": tmp_path / "evil.pt",
        "evil_pkl": tmp_path / "evil.pkl",
        "evil_npy": tmp_path / "evil.npy",
        "pickled_model": tmp_path / "model.pt",
        "truncated": tmp_path / "cut.pt",
        "text": tmp_path / "notes.pt",
    }
    torch.save(model.state_dict(), out["pt"])
    torch.save(model.state_dict(), out["legacy"], _use_new_zipfile_serialization=False)
    torchkeep.save_weights(model, out["safetensors"])
    out["pkl"].write_bytes(pickle.dumps({"lr": 0.1, "layers": [1, 2]}, protocol=2))
    np.save(out["npy"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.savez(out["npz"], a=np.arange(3), b=np.ones((2, 2)))
    torchkeep.save_model(model, out["pt2"], example_inputs=(torch.randn(1, 3, 26, 26),))
    torch.save({"weight": torch.ones(2), "hook": Payload()}, out["evil_pt"])
    out["evil_pkl"].write_bytes(pickle.dumps([Payload()], protocol=2))
    np.save(out["evil_npy"], np.array([Payload()], dtype=object), allow_pickle=True)
    torch.save(model, out["pickled_model"])
    out["truncated"].write_bytes(out["pt"].read_bytes()[:-100])
    out["text"].write_text("not a model")
    return out


@pytest.mark.parametrize(
    ("name", "verdict", "fmt"),
    [
        ("pt", "SAFE", "torch.save (zip)"),
        ("legacy", "SAFE", "torch.save (legacy, pre-1.6)"),
        ("safetensors", "SAFE", "safetensors"),
        ("pkl", "SAFE", "pickle (not written by torch.save)"),
        ("npy", "SAFE", "numpy .npy"),
        ("npz", "SAFE", "numpy .npz"),
        ("pt2", "SAFE", "torch.export (.pt2)"),
        ("evil_pt", "UNSAFE", "torch.save (zip)"),
        ("evil_pkl", "UNSAFE", "pickle (not written by torch.save)"),
        ("evil_npy", "UNSAFE", "numpy .npy"),
        ("pickled_model", "UNSAFE", "torch.save (zip)"),
        ("truncated", "CORRUPT", "unknown"),  # the reason says: a truncated zip archive
        ("text", "ERROR", "unknown"),
    ],
)
def test_verdict_and_format_per_file(files: dict[str, Path], name: str, verdict: str, fmt: str) -> None:
    result = torchkeep.scan(files[name])
    assert (result.verdict, result.format) == (verdict, fmt), result.reason


def test_findings_name_every_import_and_call_with_where(files: dict[str, Path]) -> None:
    result = torchkeep.scan(files["evil_pt"])
    found = {(f.kind, f.detail) for f in result.findings}
    assert ("import", "posix.system") in found
    assert ("call", "posix.system(…)") in found
    assert all(f.member == "evil/data.pkl" and f.offset > 0 for f in result.findings)
    assert "torch._utils._rebuild_tensor_v2" in result.imports  # allowed imports are listed too


def test_a_pickled_model_lists_all_its_classes(files: dict[str, Path]) -> None:
    result = torchkeep.scan(files["pickled_model"])
    imports = {f.detail for f in result.findings if f.kind == "import"}
    assert {"torchkeep.tutorial.TheModelClass", "torch.nn.modules.conv.Conv2d"} <= imports
    assert any(f.kind == "call" for f in result.findings)


def test_scan_matches_what_the_loader_does(files: dict[str, Path]) -> None:
    # SAFE means load_weights reads it; UNSAFE means it refuses it
    torchkeep.load_weights(files["pt"])
    torchkeep.load_weights(files["legacy"])
    for name in ("evil_pt", "pickled_model"):
        with pytest.raises(torchkeep.UnsafeFileError):
            torchkeep.load_weights(files[name])


def test_to_dict_is_json(files: dict[str, Path]) -> None:
    data = json.loads(json.dumps(torchkeep.scan(files["evil_pkl"]).to_dict()))
    assert data["verdict"] == "UNSAFE"
    assert {"kind", "detail", "member", "offset"} <= set(data["findings"][0])


def test_a_pickle_with_data_hidden_behind_it_is_unsafe(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(1)}, buffer)
    (tmp_path / "poly.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2) + buffer.getvalue())
    result = torchkeep.scan(tmp_path / "poly.pkl")
    assert result.verdict == "UNSAFE"
    assert "follow the pickle" in result.findings[0].detail


def test_cli_exit_codes(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["scan", str(files["pt"]), str(files["safetensors"])], capsys)
    assert code == 0
    assert out.count("SAFE") == 2
    code, out, _ = run_cli(["scan", str(files["pt"]), str(files["evil_pt"]), str(files["truncated"])], capsys)
    assert code == 1
    assert "posix.system" in out
    assert "evil/data.pkl @" in out
    code, out, _ = run_cli(["scan", str(files["pt"]), str(files["truncated"])], capsys)
    assert code == 2
    assert "CORRUPT" in out


def test_cli_json_and_folders(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder = files["pt"].parent
    code, out, _ = run_cli(["scan", "--json", str(folder)], capsys)
    assert code == 1
    results = {Path(r["path"]).name: r["verdict"] for r in json.loads(out)}
    assert results["w.pt"] == "SAFE"
    assert results["evil.npy"] == "UNSAFE"
    assert len(results) == len(files)


def test_cli_raise_limit(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["scan", "--raise-limit", "max_tensors=2", str(files["pt"])], capsys)
    assert code == 1
    assert "max_tensors" in out
    code, _, err = run_cli(["scan", "--raise-limit", "max_nothing=2", str(files["pt"])], capsys)
    assert code == 2
    assert "NAME=VALUE" in err

"""The torchkeep command: inspect, convert, demo, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchkeep
from conftest import tensor_data
from torchkeep.cli import main
from torchkeep.tutorial import TheModelClass


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_shows_the_table_format_and_metadata(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = torchkeep.save_weights(TheModelClass(), tmp_path / "m.safetensors", metadata={"dataset": "digits"})
    code, out, _ = run_cli(["inspect", str(path)], capsys)
    assert code == 0
    assert "safetensors" in out
    assert "dataset: digits" in out
    assert "fc1.weight" in out
    assert "[1000, 576]" in out
    assert "11 tensors" in out


def test_inspect_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = torchkeep.save_weights(TheModelClass(), tmp_path / "m.pt")
    code, out, _ = run_cli(["inspect", str(path), "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["file_format"] == "torch.save (zip)"
    assert data["totals"]["entries"] == 11
    assert {t["name"]: t["shape"] for t in data["tensors"]}["fc1.weight"] == [1000, 576]


def test_inspect_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = torchkeep.save_weights(TheModelClass(), tmp_path / "m.pt")
    code, out, _ = run_cli(["inspect", str(path), "--limit", "3"], capsys)
    assert code == 0
    assert "8 more" in out


@pytest.mark.parametrize(("src", "dst"), [("m.pt", "m.safetensors"), ("m.safetensors", "m.pt")])
def test_convert_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture[str], src: str, dst: str) -> None:
    model = TheModelClass()
    torchkeep.save_weights(model, tmp_path / src, metadata={"origin": "test"})
    code, out, _ = run_cli(["convert", str(tmp_path / src), str(tmp_path / dst)], capsys)
    assert code == 0
    assert "wrote 11 tensors" in out
    loaded = torchkeep.load_weights(tmp_path / dst)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value)
    assert torchkeep.read_metadata(tmp_path / dst)["origin"] == "test"


def test_convert_with_dtype_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = TheModelClass()
    torch.save({"ema": model.state_dict()}, tmp_path / "c.pt")
    code, _, _ = run_cli(
        [
            "convert",
            str(tmp_path / "c.pt"),
            str(tmp_path / "h.safetensors"),
            "--key",
            "ema",
            "--dtype",
            "bfloat16",
        ],
        capsys,
    )
    assert code == 0
    assert torchkeep.load_weights(tmp_path / "h.safetensors")["fc1.weight"].dtype == torch.bfloat16


def test_convert_a_pickled_model_needs_trust(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = TheModelClass()
    torch.save(model, tmp_path / "whole.pt")
    code, _, err = run_cli(["convert", str(tmp_path / "whole.pt"), str(tmp_path / "w.safetensors")], capsys)
    assert code != 0
    assert "trust" in err
    assert not (tmp_path / "w.safetensors").exists()
    code, _, _ = run_cli(
        ["convert", str(tmp_path / "whole.pt"), str(tmp_path / "w.safetensors"), "--trust"], capsys
    )
    assert code == 0
    assert torch.equal(torchkeep.load_weights(tmp_path / "w.safetensors")["fc2.bias"], model.fc2.bias)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["inspect", "nowhere.pt"], "no such file"),
        (["convert", "{tmp}/w.pt", "{tmp}/w.onnx"], "cannot tell which format"),
        (["inspect", "{tmp}/notes.txt"], "text file"),
    ],
)
def test_errors_are_one_line_and_exit_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    torchkeep.save_weights({"a": torch.ones(1)}, tmp_path / "w.pt")
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = run_cli([a.format(tmp=tmp_path) for a in args], capsys)
    assert code != 0
    assert err.startswith("error:")
    assert expected in err
    assert "Traceback" not in err


def test_python_dash_m_entry_point_and_error_exit(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    done = subprocess.run(
        [sys.executable, "-m", "torchkeep", "inspect", str(tmp_path / "empty.pt")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 4
    assert "empty" in done.stderr
    assert "Traceback" not in done.stderr
    helped = subprocess.run([sys.executable, "-m", "torchkeep", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0
    for command in ("inspect", "convert", "demo"):
        assert command in helped.stdout


@pytest.mark.slow
def test_demo_runs_green_and_leaves_the_files(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "120"}
    done = subprocess.run(
        [sys.executable, "-m", "torchkeep", "demo", "--out", str(tmp_path), "--epochs", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All checks passed" in done.stdout
    assert re.search(r"\b(\d+)/\1 checks passed", done.stdout)  # all of them, however many the demo has
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"  # the picture of the run
    assert "preempted by SIGTERM: saved, exit 0, resumed exactly" in done.stdout
    assert "resumed run continues exactly" in done.stdout
    for name in ("model.safetensors", "model.pt", "model.pt2", "checkpoint.tar"):
        assert (tmp_path / name).stat().st_size > 0
    assert torchkeep.Checkpointer(tmp_path / "run").latest is not None
    assert "bn.running_mean" in done.stdout
    loaded = torchkeep.load_model(tmp_path / "model.pt2")
    assert loaded(torch.zeros(3, 3, 26, 26)).shape == (3, 1)


def _run_with_checkpoints(tmp_path: Path) -> Path:
    model = torch.nn.Linear(3, 2)
    ckpts = torchkeep.Checkpointer(tmp_path / "run", monitor="val_loss")
    for step, loss in ((1, 0.5), (2, 0.3), (3, 0.4)):
        with torch.no_grad():
            model.weight.add_(1.0)  # each checkpoint stores tensors of its own
        ckpts.save(step, model=model, metrics={"val_loss": loss})
    return tmp_path / "run"


def test_ls_marks_best_and_latest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_with_checkpoints(tmp_path)
    code, out, _ = run_cli(["ls", str(run)], capsys)
    assert code == 0
    assert "step-00000002" in out
    assert "(best)" in out
    assert "(latest)" in out
    code, out, _ = run_cli(["ls", str(run), "--json"], capsys)
    rows = json.loads(out)
    assert [(r["step"], r["best"], r["latest"], r["valid"]) for r in rows] == [
        (1, False, False, True),
        (2, True, False, True),
        (3, False, True, True),
    ]


def test_verify_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_with_checkpoints(tmp_path)
    code, out, _ = run_cli(["verify", str(run)], capsys)
    assert code == 0
    assert out.count("valid") == 3
    tensors = tensor_data(run / "step-00000002")
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    code, out, _ = run_cli(["verify", str(run)], capsys)
    assert code == 1
    assert "invalid  step-00000002" in out
    assert "xxh3_128 checksum" in out
    code, _, _ = run_cli(["verify", str(run / "step-00000003")], capsys)
    assert code == 0
    code, _, _ = run_cli(["ls", str(run), "--verify"], capsys)
    assert code == 0


def test_verify_single_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = torchkeep.save_weights(TheModelClass(), tmp_path / "w.pt")
    assert run_cli(["verify", str(path)], capsys)[0] == 0
    path.write_bytes(path.read_bytes()[:-100])
    code, out, _ = run_cli(["verify", str(path)], capsys)
    assert code == 1
    assert "damaged" in out
    code, _, err = run_cli(["verify", str(tmp_path / "missing")], capsys)
    assert code != 0
    assert "no such file" in err

"""Tables in pipes and on narrow terminals: every name whole, plain text when piped.

The CLI runs in real subprocesses: with stdout a pipe (``| grep``), and under a pseudo-terminal
40 columns wide.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep._table import format_table

SRC = str(Path(__file__).resolve().parents[1] / "src")
LONG = "encoder." + "very_long_module_name_" * 9 + "running_mean"  # 218 characters, no spaces
ANSI = re.compile(r"\x1b\[")
BOX = re.compile("[\u2500-\u257f]")  # box-drawing characters


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def piped(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torchkeep", *args],
        capture_output=True,  # stdout is a pipe, as in `torchkeep inspect m.pt | grep running_mean`
        text=True,
        env=env(COLUMNS="80"),
        timeout=120,
    )


def on_terminal(*args: str, columns: int = 40) -> str:
    """Everything the command writes to a pseudo-terminal ``columns`` wide."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdout and stderr are the terminal
        try:
            os.execve(
                sys.executable,
                [sys.executable, "-m", "torchkeep", *args],
                env(COLUMNS=str(columns), LINES="24", TERM="xterm-256color"),
            )
        finally:
            os._exit(127)
    chunks = []
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) in (0, 1)
    return b"".join(chunks).decode()


@pytest.fixture
def long_named(tmp_path: Path) -> Path:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    state = {**model.state_dict(), LONG: torch.zeros(4)}
    return torchkeep.save_weights(state, tmp_path / "long.safetensors")


def grep(text: str, word: str) -> list[str]:
    return [line for line in text.splitlines() if word in line]


def test_inspect_in_a_pipe_is_one_plain_line_per_tensor(long_named: Path) -> None:
    done = piped("inspect", str(long_named))
    assert done.returncode == 0, done.stderr
    assert not ANSI.search(done.stdout)
    assert not BOX.search(done.stdout)
    found = grep(done.stdout, "running_mean")
    assert [line.split()[0] for line in found] == ["1.running_mean", LONG]
    assert found[1].split() == [LONG, "tensor", "[4]", "float32", "4", "16", "B"]
    names = {line.split()[0] for line in done.stdout.splitlines()}
    assert set(torchkeep.load_weights(long_named)) <= names
    assert "8 tensors" in done.stdout


def test_inspect_on_a_40_column_terminal_keeps_names_whole(long_named: Path) -> None:
    out = on_terminal("inspect", str(long_named))
    assert LONG in out
    assert "1.num_batches_tracked" in out
    assert "8 tensors" in out


def test_diff_in_a_pipe_and_on_a_narrow_terminal(tmp_path: Path) -> None:
    torchkeep.save_weights({LONG: torch.zeros(3), "a": torch.ones(1)}, tmp_path / "a.safetensors")
    torchkeep.save_weights({LONG: torch.ones(3), "b": torch.ones(1)}, tmp_path / "b.safetensors")
    done = piped("diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    assert done.returncode == 1
    assert not ANSI.search(done.stdout)
    assert done.stdout.splitlines()[0] == "0 equal, 1 changed, 1 only in A, 1 only in B"
    assert grep(done.stdout, "very_long")[0].split()[:2] == ["changed", LONG]
    assert grep(done.stdout, "only in A")[-1].split() == ["only", "in", "A", "a"]
    out = on_terminal("diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    assert LONG in out


def test_scan_in_a_pipe_and_on_a_narrow_terminal(tmp_path: Path) -> None:
    name = "w_" + "x" * 200 + ".safetensors"
    torchkeep.save_weights({"a": torch.ones(2)}, tmp_path / name)
    done = piped("scan", str(tmp_path))
    assert done.returncode == 0
    assert not ANSI.search(done.stdout)
    assert done.stdout.split() == ["SAFE", str(tmp_path / name), "safetensors"]
    assert str(tmp_path / name) in on_terminal("scan", str(tmp_path))


def test_format_table_never_cuts_and_rule_is_optional() -> None:
    text = format_table(("name", "n"), [(LONG, 1), ("b", 22)], right=(1,), rule=False)
    assert text.splitlines() == [
        "name" + " " * (len(LONG) - 4) + "   n",
        LONG + "   1",
        "b" + " " * (len(LONG) - 1) + "  22",
    ]
    assert format_table(("k",), [("v",)]).splitlines()[1] == "-"

"""Fuzzing: random damage to benign files never crashes the readers and never runs code.

Hypothesis flips bytes, truncates, splices and inserts into small benign files
of every format the readers take. Each mutant must either load or raise a
:class:`~torchkeep.TorchkeepError`; ``scan`` must always return a verdict.
While the readers run, an audit hook (installed once, armed only inside the
test) fails the test on any process spawn, or on compiling text taken from
the file.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchkeep
from torchkeep.safety import load_torch_file

_ARMED = False
_SEEN: list[str] = []
_SPAWNS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "subprocess.Popen"}


_CURRENT: list[bytes] = [b""]


def _from_file(event: str, args: tuple[Any, ...]) -> bool:
    """compile() of text taken from the file being read (torch's own lazy imports do not count)."""
    if event != "compile" or not args or args[0] is None:
        return False
    source = args[0] if isinstance(args[0], bytes) else str(args[0]).encode("utf-8", "replace")
    return len(source) >= 4 and source in _CURRENT[0]


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if _ARMED and (event in _SPAWNS or _from_file(event, args)):
        _SEEN.append(f"{event}: {str(args)[:300]}")


@pytest.fixture(scope="module", autouse=True)
def audit_hook() -> None:
    # An audit hook cannot be removed; this one does nothing unless a fuzz case is running.
    if not getattr(sys, "_torchkeep_fuzz_hook", False):
        sys.addaudithook(_hook)
        sys._torchkeep_fuzz_hook = True  # type: ignore[attr-defined]


def _benign_files() -> dict[str, bytes]:
    torch.manual_seed(0)
    state = {
        "layer.weight": torch.randn(3, 4),
        "layer.bias": torch.zeros(3),
        "bn.num_batches_tracked": torch.tensor(5),
        "half": torch.ones(2, dtype=torch.float16),
    }
    files: dict[str, bytes] = {}
    for name, kwargs in {
        "zip": {},
        "legacy": {"_use_new_zipfile_serialization": False},
        "proto4": {"pickle_protocol": 4},
    }.items():
        buffer = io.BytesIO()
        torch.save({"model": state, "epoch": 3, "cfg": {"lr": 0.1, "betas": (0.9, 0.99)}}, buffer, **kwargs)
        files[name] = buffer.getvalue()
    from safetensors.torch import save

    files["safetensors"] = save(state, metadata={"note": "fuzz"})
    return files


BENIGN = _benign_files()


@st.composite
def mutants(draw: st.DrawFn) -> bytes:
    data = bytearray(BENIGN[draw(st.sampled_from(sorted(BENIGN)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "insert", "overwrite_int"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "splice":
            start = draw(st.integers(0, max(len(data) - 1, 0)))
            length = draw(st.integers(1, 64))
            data[at:at] = data[start : start + length]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:  # a large little-endian number where a length or offset may be
            data[at : at + 4] = draw(
                st.sampled_from([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\xff\xff\xff\xff"])
            )
        if not data:
            break
    return bytes(data)


@settings(
    max_examples=int(os.environ.get("TORCHKEEP_FUZZ_EXAMPLES", "2500")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
@given(data=mutants())
def test_damaged_files_raise_only_torchkeep_errors_and_run_nothing(tmp_path: Path, data: bytes) -> None:
    global _ARMED
    path = tmp_path / "mutant.pt"
    path.write_bytes(data)
    _CURRENT[0] = data
    _ARMED = True
    try:
        for read in (
            lambda: torchkeep.load_weights(path),
            lambda: load_torch_file(path),
            lambda: torchkeep.load_checkpoint(path),
        ):
            with contextlib.suppress(torchkeep.TorchkeepError):
                read()
        verdict = torchkeep.scan(path)
    finally:
        _ARMED = False
    assert verdict.verdict in {"SAFE", "UNSAFE", "CORRUPT", "ERROR"}
    assert _SEEN == []

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
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchkeep
from torchkeep.safety import load_torch_file
from torchkeep.safety.allowlist import GLOBALS

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


# -- structured pickles: random programs from the opcodes torch.save uses -------------------

_MODULUS = sys.hash_info.modulus
_GLOBAL_NAMES = [*sorted(GLOBALS), ("os", "system"), ("builtins", "getattr"), ("torch", "load")]


def _op_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(2**31) <= n < 2**31:
        return b"J" + n.to_bytes(4, "little", signed=True)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return (
        b"\x8a" + bytes([len(raw)]) + raw
        if len(raw) < 256
        else b"\x8b" + len(raw).to_bytes(4, "little") + raw
    )


def _op_str(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    return (
        b"\x8c" + bytes([len(raw)]) + raw if len(raw) < 256 else b"X" + len(raw).to_bytes(4, "little") + raw
    )


_ints = st.one_of(
    st.integers(-300, 300),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**31, 2**63, 2**64, 10**400, -(10**400), _MODULUS, 2 * _MODULUS, -1, -2]),
    st.builds(lambda k: k * _MODULUS, st.integers(1, 50)),
)
_leaves = st.one_of(
    st.just(b"N"),
    st.sampled_from([b"\x88", b"\x89", b"]", b"}", b"\x8f", b")"]),
    _ints.map(_op_int),
    st.floats(allow_nan=True).map(lambda x: b"G" + struct.pack(">d", x)),
    st.text(max_size=12).map(_op_str),
    st.binary(max_size=12).map(lambda b: b"C" + bytes([len(b)]) + b),
    st.sampled_from(_GLOBAL_NAMES).map(lambda g: b"c" + g[0].encode() + b"\n" + g[1].encode() + b"\n"),
    st.integers(0, 8).map(lambda i: b"h" + bytes([i])),  # BINGET, maybe of an entry never written
)


def _composites(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    few = st.lists(children, max_size=5)
    return st.one_of(
        children.map(lambda c: c + b"\x85"),  # TUPLE1
        st.tuples(children, children).map(lambda t: t[0] + t[1] + b"\x86"),
        few.map(lambda cs: b"(" + b"".join(cs) + b"t"),  # TUPLE
        few.map(lambda cs: b"](" + b"".join(cs) + b"e"),  # list + APPENDS
        few.map(lambda cs: b"}(" + b"".join(cs) + (b"N" if len(cs) % 2 else b"") + b"u"),  # SETITEMS
        few.map(lambda cs: b"\x8f(" + b"".join(cs) + b"\x90"),  # set + ADDITEMS
        few.map(lambda cs: b"(" + b"".join(cs) + b"\x91"),  # FROZENSET
        st.tuples(children, few).map(lambda t: t[0] + b"(" + b"".join(t[1]) + b"tR"),  # REDUCE
        st.tuples(children, children).map(lambda t: t[0] + t[1] + b"b"),  # BUILD
        st.tuples(children, children, children).map(lambda t: t[0] + t[1] + t[2] + b"s"),  # SETITEM
        st.tuples(children, children).map(lambda t: t[0] + t[1] + b"a"),  # APPEND
        st.tuples(children, st.integers(0, 8)).map(lambda t: t[0] + b"q" + bytes([t[1]])),  # BINPUT
        children.map(lambda c: c + b"\x94"),  # MEMOIZE
        children.map(lambda c: c + b"20"),  # DUP POP
        few.map(lambda cs: b"(" + b"".join(cs) + b"tQ"),  # BINPERSID
    )


_expressions = st.recursive(_leaves, _composites, max_leaves=25)


@st.composite
def _programs(draw: st.DrawFn) -> bytes:
    expr = draw(_expressions)
    proto = draw(st.sampled_from([b"\x80\x02", b"\x80\x04"]))
    if draw(st.booleans()):  # under a key, as a state dict would hold it
        expr = b"}" + _op_str(draw(st.sampled_from(["w", "state_dict", "model_state_dict"]))) + expr + b"s"
    return proto + expr + b"."


def _storage_records(draw: st.DrawFn) -> dict[str, bytes]:
    return {f"data/{i}": bytes(draw(st.sampled_from([0, 4, 16]))) for i in range(draw(st.integers(0, 2)))}


def _outcome(read: Any) -> type[BaseException] | None:
    try:
        read()
    except torchkeep.TorchkeepError as err:
        return type(err)
    return None


@settings(
    max_examples=int(os.environ.get("TORCHKEEP_FUZZ_PICKLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
@given(program=_programs(), zipped=st.booleans(), data=st.data())
def test_random_pickles_raise_only_torchkeep_errors_and_scan_agrees(
    tmp_path: Path, program: bytes, zipped: bool, data: st.DataObject
) -> None:
    from _hostile import torch_zip

    global _ARMED
    if zipped:
        path = tmp_path / "program.pt"
        path.write_bytes(torch_zip(program, data.draw(st.composite(_storage_records)())))
    else:
        path = tmp_path / "program.pkl"
        path.write_bytes(program)
    _CURRENT[0] = program
    _ARMED = True
    try:
        reader = _outcome(lambda: load_torch_file(path))
        for read in (lambda: torchkeep.load_weights(path), lambda: torchkeep.load_checkpoint(path)):
            _outcome(read)  # anything but a TorchkeepError propagates and fails the test
        result = torchkeep.scan(path)
    finally:
        _ARMED = False
    assert _SEEN == []
    # scan runs the reader's own code: their answers agree
    if reader is None:
        assert result.verdict == "SAFE", result
    elif issubclass(reader, torchkeep.UnsafeFileError | torchkeep.LimitExceededError):
        assert result.verdict == "UNSAFE", (reader, result)
    elif issubclass(reader, torchkeep.CorruptFileError):
        assert result.verdict in {"CORRUPT", "UNSAFE"}, (reader, result)

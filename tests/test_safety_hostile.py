"""Hostile files: every entry point refuses each one with the right typed error, and no code runs.

The corpora (``tests/_hostile*.py``, one module per family of attacks) are
written fresh by the test; every entry point (the loaders, ``summarize``,
``scan``, the CLI's ``inspect`` and ``convert``) runs in a subprocess under
``sys.addaudithook`` (tests/_hostile_worker.py) that records process spawns,
exec/compile, imports of modules not loaded before, and files opened for
writing, with its address space limited to the warmed-up process plus 3 GiB.
A control run shows the payloads are real: plain unpickling of the same
files does create the marker.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest

import _hostile
import _hostile_formats
import _hostile_limits
import _hostile_pt2
import torchkeep
from _hostile import MARKER, Case, build
from torchkeep.cli import exit_code

WORKER = Path(__file__).with_name("_hostile_worker.py")
# one module per family of attacks; each writes its files with build(folder)
CORPORA: dict[str, Callable[[Path], list[Case]]] = {
    "round1": _hostile.build,
    "formats": _hostile_formats.build,
    "pt2": _hostile_pt2.build,
    "limits": _hostile_limits.build,
}
# CPU seconds all entry points together may spend refusing one file (the attacks this bounds took
# minutes); CPU time, not wall time, so a loaded machine does not change it
CPU_BUDGET = 60.0
LIBRARY = ("load_weights", "load_checkpoint", "load_into", "load_model", "summarize")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Case]]:
    folder = tmp_path_factory.mktemp("hostile")
    cases = []
    for family, build_family in CORPORA.items():
        (folder / family).mkdir()
        for case in build_family(folder / family):
            cases.append(
                dataclasses.replace(case, name=f"{family}/{case.name}", file=f"{family}/{case.file}")
            )
    return folder, cases


def _cli_outcome(error: str) -> str:
    cls = getattr(torchkeep, error)
    return f"exit {exit_code(cls.__new__(cls))}"


@pytest.fixture(scope="module")
def outcome(corpus: tuple[Path, list[Case]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder, cases = corpus
    index = tmp_path_factory.mktemp("index") / "index.json"
    index.write_text(json.dumps([asdict(c) for c in cases]))
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(folder), str(index)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_the_corpus_covers_the_known_bypass_families(corpus: tuple[Path, list[Case]]) -> None:
    _, cases = corpus
    names = {c.name.split("/", 1)[1] for c in cases}
    assert len(cases) >= 25
    for family in (
        "importlib_chain",
        "pkgutil_resolve_name",
        "memo_confusion",
        "stack_global_from_string",
        "frame_holding_payload",
        "payload_then_garbage",
        "zip_local_central_mismatch",
        "zip_slip",
        "zip_duplicate_data_pkl",
        "nested_pickle_loads",
        "nested_torch_load",
        "object_dtype_npy",
        "storage_size_mismatch",
        "view_out_of_bounds",
        "absurd_shape",
        "decompression_bomb",
        "st_header_bomb",
        "st_overlap",
        "st_duplicate_key",
        "st_trailing_data",
    ):
        assert family in names
    assert {f"polyglot_pickle_then_zip_{s}" for s in ("pt", "pth", "bin", "ckpt", "pkl")} <= names


def test_every_entry_point_refuses_every_hostile_file_with_its_typed_error(
    corpus: tuple[Path, list[Case]], outcome: dict[str, object]
) -> None:
    _, cases = corpus
    results = outcome["results"]
    assert isinstance(results, dict)
    wrong = {}
    for case in cases:
        expected = dict.fromkeys(LIBRARY, case.error)
        if case.verdict == "SAFE":  # plain data of the wrong shape: load_model sees no model in it
            expected["load_model"] = "NotAModelError"
        expected["scan"] = case.verdict
        expected["cli_inspect"] = expected["cli_convert"] = _cli_outcome(case.error)
        if results[case.name] != expected:
            wrong[case.name] = {
                k: (v, results[case.name][k]) for k, v in expected.items() if results[case.name][k] != v
            }
    assert wrong == {}


def test_scan_and_the_loaders_never_disagree(
    corpus: tuple[Path, list[Case]], outcome: dict[str, object]
) -> None:
    # Whatever a case expects: no loader loads a file scan does not call SAFE, and a file scan calls
    # SAFE is refused only because its (plain) content does not fit what was asked, never as unsafe,
    # damaged or over a limit.
    results = outcome["results"]
    assert isinstance(results, dict)
    safety_errors = {"UnsafeFileError", "CorruptFileError", "LimitExceededError"}
    for name, got in results.items():
        assert got["scan"] in {"UNSAFE", "CORRUPT", "ERROR", "SAFE"}, (name, got["scan"])
        if got["scan"] == "SAFE":
            assert not {got[entry] for entry in LIBRARY} & safety_errors, (name, got)
        else:
            assert all(got[entry] != "LOADED" for entry in LIBRARY), (name, got)
    # the corpus itself: only files of plain data may be SAFE (bad checkpoint layouts)
    assert all(case.error not in safety_errors for case in corpus[1] if case.verdict == "SAFE")


def test_every_refusal_fits_the_cpu_budget(outcome: dict[str, object]) -> None:
    cpu = outcome["cpu_seconds"]
    assert isinstance(cpu, dict)
    assert {name: s for name, s in cpu.items() if s > CPU_BUDGET} == {}


def test_no_code_ran_while_loading(corpus: tuple[Path, list[Case]], outcome: dict[str, object]) -> None:
    folder, _ = corpus
    assert outcome["violations"] == []
    assert outcome["written"] == []  # convert wrote nothing for any of them
    assert not any(folder.glob(f"*/{MARKER}"))


def test_the_payloads_are_real(tmp_path: Path) -> None:
    # Control: the same kind of file, unpickled by plain pickle, does create its marker.
    folder = tmp_path / "control"
    build(folder)
    code = "import pickle, sys\nwith open(sys.argv[1], 'rb') as f:\n    pickle.load(f)\n"
    subprocess.run(
        [sys.executable, "-c", code, str(folder / "raw_pickle_payload.pkl")], check=True, timeout=60
    )
    assert (folder / MARKER).exists()

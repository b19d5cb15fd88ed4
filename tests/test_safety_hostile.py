"""Hostile files: every loader refuses each one with the right typed error, and no code runs.

The corpus (tests/_hostile.py) is written fresh by the test; the loaders run in
a subprocess under ``sys.addaudithook`` (tests/_hostile_worker.py) that records
process spawns, exec/compile, imports of modules not loaded before, and files
opened for writing. A control run shows the payloads are real: plain
unpickling of the same files does create the marker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from _hostile import MARKER, Case, build

WORKER = Path(__file__).with_name("_hostile_worker.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Case]]:
    folder = tmp_path_factory.mktemp("hostile")
    return folder, build(folder)


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
    names = {c.name for c in cases}
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


def test_every_loader_refuses_every_hostile_file_with_its_typed_error(
    corpus: tuple[Path, list[Case]], outcome: dict[str, object]
) -> None:
    _, cases = corpus
    results = outcome["results"]
    assert isinstance(results, dict)
    wrong = {}
    for case in cases:
        expected = {
            "load_weights": case.error,
            "load_checkpoint": case.error,
            "load_into": case.error,
            "scan": case.verdict,
        }
        if results[case.name] != expected:
            wrong[case.name] = (expected, results[case.name])
    assert wrong == {}


def test_no_code_ran_while_loading(corpus: tuple[Path, list[Case]], outcome: dict[str, object]) -> None:
    folder, _ = corpus
    assert outcome["violations"] == []
    assert not (folder / MARKER).exists()


def test_the_payloads_are_real(tmp_path: Path) -> None:
    # Control: the same kind of file, unpickled by plain pickle, does create its marker.
    folder = tmp_path / "control"
    build(folder)
    code = "import pickle, sys\nwith open(sys.argv[1], 'rb') as f:\n    pickle.load(f)\n"
    subprocess.run(
        [sys.executable, "-c", code, str(folder / "raw_pickle_payload.pkl")], check=True, timeout=60
    )
    assert (folder / MARKER).exists()

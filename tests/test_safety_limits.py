"""Resource floods, zip name games, builder crashes and bent metadata: the corpus covers each class.

Every file of tests/_hostile_limits.py is loaded by every entry point in
test_safety_hostile.py, in one subprocess whose address space is capped at
its warmed-up size plus 3 GiB, with each file's CPU time checked against a
budget: a loader that allocates or computes without bound fails there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from _hostile_limits import Case, build


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Case]]:
    folder = tmp_path_factory.mktemp("hostile_limits")
    return {case.name: (folder / case.file, case) for case in build(folder)}


def _names() -> list[str]:
    # the names, without writing the files at collection time
    import ast

    source = Path(__file__).with_name("_hostile_limits.py").read_text()
    names = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "add"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.append(node.args[0].value)
    return names


NAMES = _names()


def test_the_corpus_covers_every_class(corpus: dict[str, tuple[Path, Case]]) -> None:
    assert len(corpus) >= 25
    assert set(corpus) >= set(NAMES)  # the loop-made cases come on top
    prefixes = {
        "A": "zip_case_",
        "B memo": "memo_flood",
        "B dup": "dup_flood",
        "B hash": "hash_flood_",
        "B view": "stride0_",
        "C builder": "complex_",
        "C unhashable": "unhashable_",
        "C layout": "checkpoint_",
        "C lightning": "lightning_",
        "D alias": "st_alias_",
        "D record": "pt_metadata_record_",
    }
    for family, prefix in prefixes.items():
        assert sum(name.startswith(prefix) for name in corpus) >= 1, family
    assert sum(name.startswith("st_alias_") for name in corpus) >= 4


def test_a_header_integer_of_5000_digits_is_corrupt_everywhere(tmp_path: Path) -> None:
    import struct

    import torchkeep

    header = b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'
    path = tmp_path / "digits.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with pytest.raises(torchkeep.CorruptFileError):
        torchkeep.load_weights(path)
    assert torchkeep.scan(path).verdict == "CORRUPT"

""".pt2 vetting (safety/pt2.py): every loader refuses hostile archives, nothing runs; benign ones round-trip.

The corpus (tests/_hostile_pt2.py) edits a real ``torch.export.save``; the
loaders run in a subprocess under the audit hook of tests/_hostile_worker.py.
A control run shows the payloads are real: plain ``torch.export.load`` of the
same files creates the marker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from _hostile_pt2 import CONTROL, Case, Tiny, benign_archive, build, write_zip
from torchkeep.safety.pt2 import vet_pt2
from torchkeep.safety.pt2.symexpr import BadExpression, check_sym_expr

CONTROL_SCRIPT = Path(__file__).with_name("_hostile_pt2_control.py")
# Every entry point's refusal of this corpus, under the audit hook, is in test_safety_hostile.py.


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Case]]:
    folder = tmp_path_factory.mktemp("hostile_pt2")
    return folder, build(folder)


def test_the_corpus_covers_every_construct(corpus: tuple[Path, list[Case]]) -> None:
    _, cases = corpus
    names = {c.name for c in cases}
    assert len(cases) >= 15
    assert set(CONTROL) <= names
    for family in (
        "torchbind_object",
        "sympy_attribute_in_range_constraint",
        "target_builtins_exec",
        "target_os_system_via_torch",
        "target_custom_op",
        "target_builtins_open",
        "aoti_shared_library",
        "aoti_compile_flags",
        "unknown_member",
        "member_case_twin",
        "json_nested_deep",
        "weight_size_lies",
    ):
        assert family in names


def test_the_payloads_are_real(tmp_path: Path) -> None:
    # Control: plain torch.export.load (and a call of .module() for guards) runs each payload.
    build(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(CONTROL_SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {name: True for name in CONTROL}


@pytest.mark.parametrize(
    ("name", "kind", "member", "words"),
    [
        ("weights_use_pickle", "pickle", "tiny/data/weights/weight_0", "os.system"),
        ("opaque_object", "pickle", "tiny/data/constants/opaque_obj_0", "pickle.loads"),
        ("sample_inputs_payload", "import", "tiny/data/sample_inputs/model.pt", "os.system"),
        ("guards_code", "code", "tiny/models/model.json", "guards_code"),
        ("sympy_import_in_size", "expression", "tiny/models/model.json", "__import__"),
        ("target_custom_op", "call", "tiny/models/model.json", "torch.ops.mylib.custom.default"),
        ("aoti_shared_library", "native code", "tiny/data/aotinductor/model/model.so", "model.so"),
        ("duplicate_json_key", "structure", "tiny/models/model.json", "'guards_code' twice"),
        ("member_case_twin", "member", "tiny/Models/model.json", "differ only in case"),
    ],
)
def test_scan_names_the_construct_and_member(
    corpus: tuple[Path, list[Case]], name: str, kind: str, member: str, words: str
) -> None:
    folder, _ = corpus
    result = torchkeep.scan(folder / f"{name}.pt2")
    assert result.verdict == "UNSAFE"
    assert result.format == "torch.export (.pt2)"
    assert any(f.kind == kind and f.member == member for f in result.findings)
    assert any(words in f.detail for f in result.findings)


def test_the_error_names_member_construct_and_the_trust_fix(corpus: tuple[Path, list[Case]]) -> None:
    folder, _ = corpus
    with pytest.raises(torchkeep.UnsafeFileError) as caught:
        torchkeep.load_model(folder / "guards_code.pt2")
    err = caught.value
    assert err.member == "tiny/models/model.json"
    assert "guards_code" in str(err)
    assert "trust=True" in str(err)


def test_scan_reports_every_problem_not_only_the_first(tmp_path: Path) -> None:
    records = benign_archive()
    records["tiny/notes/a.txt"] = b"a"
    records["tiny/data/aotinductor/model/model.so"] = b"\x7fELF"
    doc = json.loads(records["tiny/models/model.json"])
    doc["guards_code"] = ["True"]
    records["tiny/models/model.json"] = json.dumps(doc).encode()
    write_zip(tmp_path / "many.pt2", records)
    result = torchkeep.scan(tmp_path / "many.pt2")
    assert result.verdict == "UNSAFE"
    assert sorted(f.kind for f in result.findings) == ["code", "member", "native code"]


def test_trust_hands_the_file_to_torch_as_it_is(corpus: tuple[Path, list[Case]]) -> None:
    folder, _ = corpus
    # an unknown member is harmless to torch: with trust=True the program loads
    loaded = torchkeep.load_model(folder / "unknown_member.pt2", trust=True)
    x = torch.randn(3, 4)
    torch.manual_seed(0)
    original = Tiny().eval()
    assert torch.equal(loaded(x), original(x))


# -- the grammar ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Symbol('s77', positive=True, integer=True)",
        "Mul(Integer(96), Symbol('s77', positive=True, integer=True))",
        "Min(Integer(32), Mul(Integer(32), Symbol('s77', positive=True, integer=True)))",
        "Add(Symbol('u3', integer=True), Integer(-1))",
        "2*s0 + 1",
        "s0 // 2 % 3 - -u1",
        "Max(s0, s1) <= 64",
        "StrictLessThan(Symbol('s0', integer=True), Integer(5))",
    ],
)
def test_shape_arithmetic_is_accepted(text: str) -> None:
    check_sym_expr(text)


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('x')",
        "(lambda: 1)()",
        "s0.__class__",
        "Symbol('s0').func",
        "Symbol('os.system')",
        "Integer(1)[0]",
        "eval('1')",
        "s0 ** 2",
        "Float(1.5)",
        "s0 if s1 else s2",
        "'s0'",
        "Symbol('s0', evaluate=__import__)",
        "(" * 100 + "s0" + ")" * 100,
        "1" * 31,
        "s0 +",
    ],
)
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(BadExpression):
        check_sym_expr(text)


# -- benign programs round-trip ----------------------------------------------------------


def _torchvision_models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    return {
        "resnet18": (torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 64, 64)),
        "mobilenet_v3_small": (
            torchvision.models.mobilenet_v3_small(num_classes=10),
            torch.randn(2, 3, 64, 64),
        ),
        "vit": (vit, torch.randn(2, 3, 32, 32)),
    }


def _round_trip(model: nn.Module, x: torch.Tensor, path: Path, *, dynamic: bool) -> None:
    model.eval()
    # every model here names its input x
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=64)}} if dynamic else None
    torchkeep.save_model(model, path, example_inputs=(x,), dynamic_shapes=shapes)
    assert torchkeep.scan(path).verdict == "SAFE"
    loaded = torchkeep.load_model(path)
    batches = [x, torch.cat([x, x, x[:1]])] if dynamic else [x]
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(loaded(batch), model(batch), rtol=1e-5, atol=1e-5)
    weights = torchkeep.load_weights(path)
    state = {k: v for k, v in model.state_dict().items() if k in weights}
    assert sorted(weights) == sorted(state)
    assert all(torch.equal(weights[k], state[k]) for k in state)


@pytest.mark.parametrize("dynamic", [False, True])
def test_the_tutorial_model_round_trips(
    model: nn.Module, images: torch.Tensor, tmp_path: Path, dynamic: bool
) -> None:
    _round_trip(model, images, tmp_path / "m.pt2", dynamic=dynamic)
    loaded = torchkeep.load_model(tmp_path / "m.pt2")
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_a_model_with_tensor_constants_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny = Tiny()
    _round_trip(tiny, torch.randn(2, 4), tmp_path / "t.pt2", dynamic=True)
    program = vet_pt2(tmp_path / "t.pt2")
    assert program.payloads  # weights and the non-persistent buffer, as raw records
    assert (
        program.documents["data/constants/model_constants_config.json"]["config"]["scale"]["use_pickle"]
        is False
    )


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "vit"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_torchvision_classifiers_round_trip(name: str, dynamic: bool, tmp_path: Path) -> None:
    model, x = _torchvision_models()[name]
    _round_trip(model, x, tmp_path / f"{name}.pt2", dynamic=dynamic)


def test_torch_never_unpickles_loads_native_code_or_evaluates_unvetted_text(
    model: nn.Module, images: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pickle

    import sympy
    from torch.export.pt2_archive import _package

    path = torchkeep.save_model(
        model, tmp_path / "m.pt2", example_inputs=(images,), dynamic_shapes=({0: torch.export.Dim("b")},)
    )

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch reached an unpickling or native-code path")

    # only inside this test: the paths of torch.export.load that would run file content
    for owner, name in (
        (torch, "load"),
        (pickle, "loads"),
        (torch._C, "_pickle_load_obj"),
        (_package, "_load_aoti"),
    ):
        monkeypatch.setattr(owner, name, forbidden)
    evaluated: list[str] = []
    real_sympify = sympy.sympify

    def recording_sympify(text: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(text, str):
            evaluated.append(text)
        return real_sympify(text, *args, **kwargs)

    monkeypatch.setattr(sympy, "sympify", recording_sympify)
    loaded = torchkeep.load_model(path)
    monkeypatch.undo()
    assert evaluated  # the dynamic batch size is a symbolic expression ...
    for text in evaluated:
        check_sym_expr(text)  # ... and each one torch evaluated passed the grammar
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))

""".pt2 vetting (safety/pt2/): every loader refuses hostile archives, nothing runs; benign ones round-trip.

The corpus (tests/_hostile_pt2.py) edits a real ``torch.export.save``; the
loaders run in a subprocess under the audit hook of tests/_hostile_worker.py.
A control run shows the payloads are real: plain ``torch.export.load`` of the
same files creates the marker.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from _hostile_pt2 import CONTROL, Case, Tiny, benign_archive, build, write_zip
from torchkeep.safety.pt2 import load_vetted, vet_pt2
from torchkeep.safety.pt2.graph import MAX_BITS, check_graph
from torchkeep.safety.pt2.ops import REVIEWED, allowed_operators, operator_problem
from torchkeep.safety.pt2.symexpr import MAX_SYMBOLS, MAX_TERMS, BadExpression, check_sym_expr

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
        "op_reshape_alias_oob_read",
        "op_sparse_oob_write",
        "op_set_grad_enabled",
        "python_pow_huge_exponent",
        "python_mul_string",
        "python_int_past_int64",
        "python_repeated_squaring",
        "sympy_expansion_k20",
        "string_graph_input",
        "weight_deflated",
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


def test_case_twins_are_refused_by_the_zip_reader_before_anything_else(
    corpus: tuple[Path, list[Case]],
) -> None:
    # one check for every zip: the strict reader refuses names that fold together, for any format
    folder, _ = corpus
    result = torchkeep.scan(folder / "member_case_twin.pt2")
    assert result.verdict == "UNSAFE"
    assert [(f.kind, f.member) for f in result.findings] == [("structure", "tiny/Models/model.json")]
    assert "differ only in case" in result.findings[0].detail


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
        ("op_reshape_alias_oob_read", "call", "tiny/models/model.json", "_reshape_alias.default"),
        ("op_sparse_oob_write", "call", "tiny/models/model.json", "_sparse_coo_tensor_unsafe"),
        ("op_set_grad_enabled", "call", "tiny/models/model.json", "set_grad_enabled"),
        ("python_pow_huge_exponent", "call", "tiny/models/model.json", "exponent"),
        ("python_mul_string", "call", "tiny/models/model.json", "'as_string'"),
        ("python_int_past_int64", "value", "tiny/models/model.json", "outside int64"),
        ("python_repeated_squaring", "call", "tiny/models/model.json", "8064-bit"),
        ("sympy_expansion_k20", "expression", "tiny/models/model.json", "multiplies out"),
        ("string_graph_input", "construct", "tiny/models/model.json", "'as_string'"),
        ("weight_deflated", "member", "tiny/data/weights/weight_0", "compressed"),
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


# -- the operator allowlist ------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        a, _ = self.mha(h, h, h)
        q = a.view(a.shape[0], a.shape[1], 2, 8).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        o = o.transpose(1, 2).reshape(a.shape)
        return torch.nn.functional.gelu(self.fc(o)) + torch.nn.functional.gelu(o, approximate="tanh")


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0] + self.gru(x)[0]


class Layers(nn.Module):
    """Embedding, BatchNorm, dropout, interpolation and pooling variants."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 3)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.up = nn.ConvTranspose2d(3, 3, 2, stride=2)
        self.norms = nn.ModuleList([nn.GroupNorm(1, 3), nn.InstanceNorm2d(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional
        i = self.conv(self.drop(self.bn(x))) + self.emb.weight.sum() + self.norms[0](x) + self.norms[1](x)
        parts = [
            f.max_pool2d(i, 2),
            f.avg_pool2d(i, 2),
            f.adaptive_avg_pool2d(i, 3),
            f.adaptive_max_pool2d(i, 2),
            f.max_pool2d(i, 3, stride=2, padding=1, ceil_mode=True),
            f.interpolate(i, scale_factor=2, mode="nearest"),
            f.interpolate(i, scale_factor=2, mode="bilinear", align_corners=False),
            f.interpolate(i, size=(5, 5), mode="bicubic"),
            self.up(i),
            f.hardswish(i),
            f.softmax(i, -1),
        ]
        return torch.stack([p.flatten(1).sum(1) for p in parts], 1)


# torch 2.14's export of nn.LSTM / nn.GRU warns about their _flat_weights (harmless: they are parameters)
_RNN_WARNING = "ignore:The tensor attributes:UserWarning"


def _benign_models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "attention": (Attention(), torch.randn(2, 5, 16)),
        "recurrent": (Recurrent(), torch.randn(2, 5, 8)),
        "layers": (Layers(), torch.randn(2, 3, 8, 8)),
    }


def _targets(program: torch.export.ExportedProgram) -> set[str]:
    out = set()
    for node in program.graph.nodes:
        if node.op == "call_function":
            t = node.target
            out.add(
                f"torch.ops.{t}" if isinstance(t, torch._ops.OpOverload) else f"{t.__module__}.{t.__name__}"
            )
    return out


@pytest.mark.filterwarnings(_RNN_WARNING)
def test_every_operator_of_the_benign_models_is_allowed(model: nn.Module, images: torch.Tensor) -> None:
    models = {**_benign_models(), "tutorial": (model, images)}
    with contextlib.suppress(pytest.skip.Exception):
        models |= _torchvision_models()
    seen: set[str] = set()
    for name, (module, x) in models.items():
        module.eval()
        for dynamic in (None, {"x": {0: torch.export.Dim("batch", min=1, max=64)}}):
            arg = {"x": dynamic["x"]} if dynamic else None
            exported = torch.export.export(module, (x,), dynamic_shapes=arg)
            for program in (exported, exported.run_decompositions()):
                for target in _targets(program):
                    assert operator_problem(target) is None, (name, target, operator_problem(target))
                    seen.add(target)
    assert len(seen) > 60  # the models exercise a good part of the list


@pytest.mark.filterwarnings(_RNN_WARNING)
@pytest.mark.parametrize("name", ["attention", "recurrent", "layers"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_models_with_attention_recurrence_and_layers_round_trip(
    name: str, dynamic: bool, tmp_path: Path
) -> None:
    module, x = _benign_models()[name]
    _round_trip(module, x, tmp_path / f"{name}.pt2", dynamic=dynamic)


def test_the_allowlist_is_core_aten_plus_the_reviewed_operators() -> None:
    allowed = allowed_operators()
    assert {f"torch.ops.aten.{op}" for op in REVIEWED} <= allowed  # every reviewed one exists here
    core = {t for t in allowed if f"{t.split('.', 3)[3]}" not in REVIEWED}
    assert 150 < len(core) < 250
    assert 250 < len(allowed) < 400
    assert not any("unsafe" in t or "sparse" in t or "backward" in t or t.endswith(".out") for t in allowed)


@pytest.mark.parametrize(
    "op",
    [
        "_reshape_alias.default",
        "_reshape_alias_copy.default",
        "_sparse_coo_tensor_unsafe.default",
        "_sparse_coo_tensor_with_dims_and_tensors.default",
        "_sparse_csr_tensor_unsafe.default",
        "_to_dense.default",
        "_nested_view_from_buffer.default",
        "_unsafe_index.Tensor",
        "_unsafe_index_put.default",
        "_unsafe_view.default",
        "quantize_per_tensor.default",
        "set_grad_enabled.default",
        "manual_seed.default",
        "seed.default",
        "set_data.default",
        "set_.source_Storage",
        "_cufft_clear_plan_cache.default",
        "_cufft_set_plan_cache_max_size.default",
        "from_file.default",
        "save.default",
        "_print.default",
        "empty.memory_format",
        "empty_strided.default",
        "resize_.default",
        "max_pool2d_with_indices_backward.default",
        "atan2.out",
    ],
)
def test_unsafe_and_state_changing_operators_are_refused(op: str) -> None:
    reason = operator_problem(f"torch.ops.aten.{op}")
    assert reason is not None
    assert op.split(".")[0] in reason


def test_prims_custom_and_python_callables_are_refused() -> None:
    for target in ("torch.ops.prims.as_strided.default", "torch.ops.mylib.f.default", "builtins.exec"):
        assert operator_problem(target) is not None
    assert operator_problem("_operator.mul") is None
    assert operator_problem("torch.ops.aten.linear.default") is None
    assert operator_problem("torch.ops.aten.as_strided.default") is None  # core, and bounds-checked


# -- Python arithmetic ---------------------------------------------------------------------


def _python_graph(*nodes: tuple[str, list[dict[str, Any]], str]) -> dict[str, Any]:
    size = {
        "target": "torch.ops.aten.sym_size.int",
        "inputs": [
            {"name": "self", "arg": {"as_tensor": {"name": "x"}}},
            {"name": "dim", "arg": {"as_int": 0}},
        ],
        "outputs": [{"as_sym_int": {"as_name": "n"}}],
    }
    return {
        "inputs": [{"as_tensor": {"name": "x"}}],
        "nodes": [size]
        + [
            {
                "target": target,
                "inputs": [{"name": f"a{i}", "arg": a} for i, a in enumerate(args)],
                "outputs": [{"as_sym_int": {"as_name": out}}],
                "name": out,
            }
            for target, args, out in nodes
        ],
    }


def _problems(graph: dict[str, Any]) -> list[str]:
    found: list[str] = []
    check_graph(graph, lambda kind, detail: found.append(detail))
    return found


N = {"as_sym_int": {"as_name": "n"}}


def test_shape_arithmetic_export_writes_passes() -> None:
    # what export writes for x.view(n * 2, -1) + (n // 2 + n ** 2)
    graph = _python_graph(
        ("_operator.mul", [N, {"as_int": 2}], "mul"),
        ("_operator.floordiv", [N, {"as_int": 2}], "fd"),
        ("_operator.pow", [N, {"as_int": 2}], "sq"),
        ("_operator.add", [{"as_sym_int": {"as_name": "fd"}}, {"as_sym_int": {"as_name": "sq"}}], "add"),
        ("_operator.mul", [{"as_sym_int": {"as_name": "mul"}}, {"as_sym_int": {"as_name": "add"}}], "all"),
    )
    assert _problems(graph) == []


@pytest.mark.parametrize(
    ("target", "args", "words"),
    [
        ("_operator.pow", [{"as_int": 3}, {"as_int": 1 << 40}], "exponent"),
        ("_operator.pow", [{"as_int": 3}, N], "exponent"),
        ("_operator.pow", [N, {"as_int": 65}], "exponent"),
        ("_operator.mul", [{"as_string": "A"}, {"as_int": 1 << 34}], "'as_string'"),
        ("_operator.mul", [{"as_ints": [1]}, {"as_int": 1 << 34}], "'as_ints'"),
        ("_operator.add", [{"as_strings": ["a"]}, {"as_int": 1}], "'as_strings'"),
    ],
)
def test_python_arithmetic_that_could_grow_without_bound_is_refused(
    target: str, args: list[dict[str, Any]], words: str
) -> None:
    (problem,) = _problems(_python_graph((target, args, "big")))
    assert words in problem


def test_repeated_squaring_is_refused_at_the_node_that_passes_the_bound() -> None:
    nodes = [("_operator.mul", [N, N], "sq0")]
    nodes += [("_operator.mul", [{"as_sym_int": {"as_name": f"sq{i}"}}] * 2, f"sq{i + 1}") for i in range(8)]
    problems = _problems(_python_graph(*nodes))
    # 64-bit sizes: 128, 256, ... 4096 bits pass; the next square (8192 bits) does not
    assert MAX_BITS == 64 << 6
    assert problems
    assert "'sq6'" in problems[0]
    assert "8192-bit" in problems[0]


def test_integers_outside_int64_are_refused_anywhere(tmp_path: Path) -> None:
    records = benign_archive()
    doc = json.loads(records["tiny/models/model.json"])
    doc["graph_module"]["graph"]["tensor_values"]["x"]["strides"][1] = {"as_int": 1 << 63}
    records["tiny/models/model.json"] = json.dumps(doc).encode()
    write_zip(tmp_path / "big.pt2", records)
    with pytest.raises(torchkeep.UnsafeFileError, match="outside int64"):
        vet_pt2(tmp_path / "big.pt2")


# -- expansion bounds ------------------------------------------------------------------------


def _product(k: int) -> str:
    return "*".join(f"(s{2 * i + 1}+s{2 * i + 2})" for i in range(k))


def test_an_expression_that_expands_exponentially_is_refused(corpus: tuple[Path, list[Case]]) -> None:
    with pytest.raises(BadExpression, match="multiplies out"):
        check_sym_expr(f"FloorDiv({_product(20)}, s1+s3+1)")
    with pytest.raises(BadExpression, match="multiplies out"):
        check_sym_expr(f"FloorDiv(Mul({_product(4)}, Add(s9, s10, s11, s12, s13)), 2)")  # 16 * 5 = 80
    check_sym_expr(f"FloorDiv({_product(6)}, s1+s3+1)")  # 2**6 = MAX_TERMS terms: allowed
    assert MAX_TERMS == 2**6
    folder, _ = corpus
    with pytest.raises(torchkeep.UnsafeFileError, match="multiplies out"):
        torchkeep.load_model(folder / "sympy_expansion_k20.pt2")


def test_an_expression_with_too_many_symbols_is_refused() -> None:
    check_sym_expr(" + ".join(f"s{i}" for i in range(MAX_SYMBOLS)))
    with pytest.raises(BadExpression, match="distinct symbols"):
        check_sym_expr(" + ".join(f"s{i}" for i in range(MAX_SYMBOLS + 1)))


@pytest.mark.parametrize(
    "text",
    [
        "FloorDiv(s0 - 1, 2) + 1",
        "Add(FloorDiv(Add(Symbol('s0', positive=True, integer=True), Integer(-1)), Integer(2)), Integer(1))",
        "(s0 + 1)*(s1 + 1)*(s2 + 2)",
    ],
)
def test_conv_stack_arithmetic_is_within_the_bounds(text: str) -> None:
    check_sym_expr(text)


def test_a_conv_stack_with_dynamic_height_and_width_stays_within_the_bounds() -> None:
    # such a program carries guards_code (refused on its own), so its expressions are checked here
    import io
    import zipfile

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.MaxPool2d(2)
    ).eval()
    dims = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    exported = torch.export.export(net, (torch.randn(2, 3, 40, 36),), dynamic_shapes=({**dims},))
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    with zipfile.ZipFile(buffer) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("models/model.json")]
        text = archive.read(name).decode()
    exprs = re.findall(r'"expr_str": "((?:[^"\\]|\\.)*)"', text)
    assert any("FloorDiv" in e for e in exprs)  # the downsampling arithmetic
    for expr in exprs:
        check_sym_expr(json.loads(f'"{expr}"'))


# -- the archive ------------------------------------------------------------------------------


def test_a_compressed_member_is_refused_before_it_is_inflated(corpus: tuple[Path, list[Case]]) -> None:
    folder, _ = corpus
    with pytest.raises(torchkeep.UnsafeFileError, match="compressed") as caught:
        vet_pt2(folder / "weight_deflated.pt2")
    assert caught.value.member == "tiny/data/weights/weight_0"


def test_what_torch_reads_is_what_was_vetted_even_if_the_file_changes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny = Tiny().eval()
    path = torchkeep.save_model(tiny, tmp_path / "t.pt2", example_inputs=(torch.randn(2, 4),))
    program = vet_pt2(path)
    # after vetting, the file is swapped for one with other weights and an unvetted operator
    records = benign_archive()
    doc = json.loads(records["tiny/models/model.json"])
    doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten._reshape_alias.default"
    records["tiny/models/model.json"] = json.dumps(doc).encode()
    write_zip(path, records)
    loaded = load_vetted(program).module()
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny(x))

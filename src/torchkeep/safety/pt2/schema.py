"""The exact schema of a ``.pt2`` program's ``models/<name>.json`` and its payload configs.

Written from ``torch/_export/serde/schema.py`` (schema 8.x, torch 2.14) and
narrowed to what a plain model needs: every field is known, every union has
one of the listed variants, and the values torch turns into code are checked
on the way:

* call targets: the operator allowlist of :mod:`.ops`; the Python shape
  arithmetic nodes are then checked as a whole by :mod:`.graph`;
* names that FX writes into generated Python source (nodes, forward
  arguments, attributes): identifiers only;
* symbolic expressions (``sympy.sympify``): :mod:`.symexpr`, and at most
  ``MAX_EXPRESSIONS`` of them (``MAX_TOTAL_LENGTH`` characters) per program;
* every integer: within int64 (torch's own range; Python's are unbounded);
* ``guards_code`` (compiled and run by ``.module()``): must be empty;
* pytree specs: tuples, lists, dicts of plain keys;
* no custom objects, tokens, subgraphs; no strings as graph or call inputs
  (``.module()`` writes input constants into generated guard code).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from torchkeep.safety.pt2.graph import check_graph
from torchkeep.safety.pt2.ops import operator_problem
from torchkeep.safety.pt2.symexpr import (
    MAX_EXPRESSIONS,
    MAX_TOTAL_LENGTH,
    SYMBOL,
    BadExpression,
    check_sym_expr,
)
from torchkeep.safety.pt2.walk import (
    FQN,
    Count,
    Problem,
    check_fqn,
    check_ident,
    check_treespec,
    walk,
)

__all__ = ["FQN", "check_payload_config", "check_program"]

_DEVICES = frozenset({"cpu", "cuda", "mps", "xpu", "meta"})
# FX writes a comment from stack_trace into generated source: nothing that Python reads as a line break
_LINE_BREAKS = re.compile(r"[\x00-\x09\x0b-\x1f\x7f\x85\u2028\u2029]")
_Spec = Any


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
    check_ident(value, where, problem)


def _fqn(value: Any, where: str, problem: Problem) -> None:
    check_fqn(value, where, problem)


def _device(value: Any, where: str, problem: Problem) -> None:
    if value["type"] not in _DEVICES or (value.get("index") is not None and not 0 <= value["index"] < 1024):
        problem("value", f"{where} names the unknown device {str(value)[:60]!r}")


def _names(value: Any, where: str, problem: Problem) -> None:
    for key in value:
        check_ident(key, f"a value name in {where}", problem)


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
# what a graph or a call signature takes as input: no strings (.module() writes input constants into
# the guard code it generates and compiles)
INPUT_ARGUMENT = (
    "union",
    {
        "as_none": "bool",
        "as_tensor": TENSOR_ARG,
        "as_tensors": ("list", TENSOR_ARG),
        "as_int": "int",
        "as_ints": ("list", "int"),
        "as_float": "float",
        "as_floats": ("list", "float"),
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
# an operator's arguments may also be strings (gelu's approximate, einsum's equation); graph.py
# refuses them for Python targets
ARGUMENT = ("union", {**INPUT_ARGUMENT[1], "as_string": "str", "as_strings": ("list", "str")})
NODE = _s(
    target=_req(("check", "str", _target)),
    inputs=_req(("list", _s(name=_req(NAME), arg=_req(ARGUMENT), kind=_opt(("enum", frozenset({0, 1, 2})))))),
    outputs=_req(("list", ARGUMENT)),
    metadata=_req(("check", ("dict", "str"), _metadata)),
    is_hop_single_tensor_return=_opt("bool"),
    name=_opt(NAME),
)
GRAPH = _s(
    inputs=_req(("list", INPUT_ARGUMENT)),
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
    inputs=_req(("list", INPUT_ARGUMENT)),
    outputs=_req(("list", ARGUMENT)),
    in_spec=_req(("check", "str", check_treespec)),
    out_spec=_req(("check", "str", check_treespec)),
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
    counted = Count(problem)
    walk(doc, PROGRAM, "model", counted)
    if counted.count:
        return  # the graph-wide checks read fields the schema has not vouched for
    lengths = [len(text) for text in _expressions(doc, 0)]
    if len(lengths) > MAX_EXPRESSIONS or sum(lengths) > MAX_TOTAL_LENGTH:
        problem(
            "expression",
            f"{len(lengths)} symbolic expressions of {sum(lengths)} characters in all (at most "
            f"{MAX_EXPRESSIONS} / {MAX_TOTAL_LENGTH}); torch would sympify every one",
        )
    check_graph(doc["graph_module"]["graph"], problem)


def _expressions(value: Any, depth: int) -> Iterator[str]:
    # the schema admits expr_str only in SYM_EXPR, and bounded nesting (depth <= max_depth)
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "expr_str" and isinstance(item, str):
                yield item
            else:
                yield from _expressions(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from _expressions(item, depth + 1)


def check_payload_config(doc: Any, where: str, problem: Problem) -> None:
    """Report what in a weights / constants config is outside the schema (the caller checks entries)."""
    walk(doc, PAYLOAD_CONFIG, where, problem)

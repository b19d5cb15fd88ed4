"""A small schema language for JSON documents, and the name and pytree checks it uses.

A spec is ``"str" | "int" | "bool" | "float"`` (ints within int64), ``("list", s)``,
``("dict", s)``, ``("opt", s)``, ``("struct", {field: (s, required)})``,
``("union", {variant: s})`` (an object with exactly one of the variants),
``("enum", {values})`` or ``("check", s, fn)``: ``s``, then ``fn(value, where, problem)``.
:func:`walk` reports every mismatch through ``problem(kind, detail)``.
"""

from __future__ import annotations

import json
import keyword
import re
from collections.abc import Callable
from typing import Any

__all__ = ["FQN", "IDENT", "INT64", "Count", "Problem", "check_fqn", "check_ident", "check_treespec", "walk"]

# (kind, detail) for each problem; the caller turns them into errors or findings
Problem = Callable[[str, str], None]

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
FQN = re.compile(r"(?:[A-Za-z0-9_]{1,128})(?:\.[A-Za-z0-9_]{1,128}){0,63}")
INT64 = range(-(1 << 63), 1 << 63)
_MAX_STRING = 1 << 16


def check_ident(name: object, what: str, problem: Problem) -> None:
    if not (isinstance(name, str) and IDENT.fullmatch(name) and not keyword.iskeyword(name)):
        problem(
            "name", f"{what} {str(name)[:80]!r} is not a Python identifier (it would be written into code)"
        )


def check_fqn(name: object, what: str, problem: Problem) -> None:
    if not (isinstance(name, str) and FQN.fullmatch(name)) or any(
        part.startswith("__") for part in str(name).split(".")
    ):
        problem("name", f"{what} {str(name)[:80]!r} is not a plain dotted attribute name")


_Spec = Any
_SCALARS = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and v in INT64,
    "bool": lambda v: isinstance(v, bool),
    "float": lambda v: isinstance(v, float | int) and not isinstance(v, bool),
}


def walk(value: Any, spec: _Spec, where: str, problem: Problem, depth: int = 0) -> None:
    if depth > 200:
        problem("structure", f"{where} is nested too deeply")
        return
    if isinstance(spec, str):
        if not _SCALARS[spec](value):
            if spec == "int" and isinstance(value, int) and not isinstance(value, bool):
                problem("value", f"{where} = {str(value)[:40]} is outside int64 (torch's range for integers)")
                return
            problem("structure", f"{where} should be a {spec}, it is {type(value).__name__}")
        elif spec == "str" and len(value) > _MAX_STRING:
            problem("structure", f"{where} is a string of {len(value)} characters")
        return
    kind = spec[0]
    if kind == "opt":
        if value is not None:
            walk(value, spec[1], where, problem, depth + 1)
    elif kind == "list":
        if not isinstance(value, list):
            problem("structure", f"{where} should be a list")
            return
        for i, item in enumerate(value):
            walk(item, spec[1], f"{where}[{i}]", problem, depth + 1)
    elif kind == "dict":
        if not isinstance(value, dict):
            problem("structure", f"{where} should be an object")
            return
        for key, item in value.items():
            walk(item, spec[1], f"{where}[{key[:60]!r}]", problem, depth + 1)
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
        walk(item, spec[1][variant], f"{where}.{variant}", problem, depth + 1)
    elif kind == "check":
        before = Count(problem)
        walk(value, spec[1], where, before, depth + 1)
        if not before.count:
            spec[2](value, where, problem)


class Count:
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
            walk(value[key], spec, f"{where}.{key}", problem, depth + 1)
        elif required:
            problem("structure", f"{where} lacks the field {key!r}")


def check_treespec(value: Any, where: str, problem: Problem) -> None:
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

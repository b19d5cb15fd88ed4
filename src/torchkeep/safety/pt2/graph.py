"""The Python shape-arithmetic nodes of a ``.pt2`` graph, checked as a whole.

Operators run in torch's kernels, but the ``_operator`` / ``math`` /
``torch.sym_*`` targets of :data:`.ops.PYTHON_TARGETS` run as Python when
the loaded module is called, on Python's unbounded numbers: ``pow(3, 2**40)``
holds the GIL for hours, ``mul("A", 2**34)`` makes a 16 GiB string, and
``mul(a, a)`` repeated squares a number into gigabytes in a few dozen
nodes. So, node by node in graph order:

* a Python target takes numbers only (``as_int``, ``as_float``, ``as_bool``
  and their symbolic forms; ``getitem`` also tensors): no strings or lists,
  whose ``*`` repeats them;
* every integer it can produce is bounded: each value gets an upper bound on
  its bit length (a size from an operator or an input: 64; a constant: its
  own; ``a * b``: the sum; ``a + b``: one more than the larger;
  ``a ** e``: the base's times ``e``, and ``e`` must be a constant between 0
  and 64; ``ceil`` of a float: 1024), and a node whose bound exceeds
  :data:`MAX_BITS` is refused. Floats are fixed-size and need no bound.

``pow`` stays allowed (export writes ``pow(sym_size, 2)`` for ``n ** 2``)
only with such a constant exponent: with a symbolic exponent even a 64-bit
bound gives ``2**64``-bit numbers.
"""

from __future__ import annotations

from typing import Any

from torchkeep.safety.pt2.ops import PYTHON_TARGETS
from torchkeep.safety.pt2.walk import Problem

__all__ = ["MAX_BITS", "check_graph"]

MAX_BITS = 4096  # bit length any Python integer of the graph may reach (microseconds per operation)
_FLOAT = -1  # the bound of a float (fixed size)
_SIZE = 64  # what an operator's or an input's symbolic integer can be: int64
_MAX_EXPONENT = 64
_NUMBERS = frozenset({"as_int", "as_float", "as_bool", "as_sym_int", "as_sym_float", "as_sym_bool"})
_GETITEM = _NUMBERS | {"as_tensor", "as_tensors"}
_ADDS = frozenset({"_operator.add", "_operator.sub"})
_SAME = frozenset({"_operator.neg", "_operator.pos", "_operator.abs", "math.trunc", "torch.sym_int"})
_WIDEST = frozenset(
    {
        "_operator.floordiv",
        "_operator.mod",
        "_operator.and_",
        "_operator.or_",
        "torch.sym_max",
        "torch.sym_min",
    }
)
_BOOLS = frozenset(
    {f"_operator.{n}" for n in ("eq", "ne", "lt", "le", "gt", "ge", "not_")} | {"torch.sym_not"}
)
_TO_FLOAT = frozenset({"_operator.truediv", "math.sqrt", "torch.sym_float"})
_TO_INT = frozenset({"math.ceil", "math.floor", "math.trunc", "torch.sym_int"})


def check_graph(graph: dict[str, Any], problem: Problem) -> None:
    """Report the Python nodes of a schema-checked graph that take non-numbers or grow numbers unboundedly."""
    bits: dict[str, int] = {}
    for arg in graph["inputs"]:
        _bind(arg, _SIZE, bits)
    for node in graph["nodes"]:
        target = node["target"]
        if target not in PYTHON_TARGETS:
            for out in node["outputs"]:
                _bind(out, _SIZE, bits)
            continue
        where = f"the node {str(node.get('name'))[:60]!r} ({target})"
        allowed = _GETITEM if target == "_operator.getitem" else _NUMBERS
        args = [entry["arg"] for entry in node["inputs"]]
        odd = [variant for arg in args for variant in arg if variant not in allowed]
        if odd:
            problem(
                "call",
                f"{where} takes {odd[0]!r}; Python shape arithmetic takes numbers only (a string or "
                "list times an integer is repeated in memory)",
            )
            continue
        result = _bound(target, [_arg_bits(arg, bits) for arg in args], [_constant(arg) for arg in args])
        if result is None or result > MAX_BITS:
            what = "a symbolic or out-of-range exponent" if result is None else f"up to {result}-bit integers"
            problem(
                "call",
                f"{where} computes {what} (at most {MAX_BITS} bits; Python's integers are unbounded, "
                "so this would hang or exhaust memory when the model is called)",
            )
            result = MAX_BITS
        for out in node["outputs"]:
            _bind(out, result, bits)


def _bind(arg: dict[str, Any], bound: int, bits: dict[str, int]) -> None:
    ((variant, value),) = arg.items()
    if variant in {"as_sym_int", "as_sym_float", "as_sym_bool"} and "as_name" in value:
        kinds = {"as_sym_float": _FLOAT, "as_sym_bool": 1}
        bits[value["as_name"]] = kinds.get(variant, bound)
    elif variant == "as_sym_ints":
        for item in value:
            if "as_name" in item:
                bits[item["as_name"]] = _SIZE


def _arg_bits(arg: dict[str, Any], bits: dict[str, int]) -> int:
    ((variant, value),) = arg.items()
    if variant in {"as_float", "as_sym_float"}:
        return _FLOAT
    if variant in {"as_bool", "as_sym_bool"}:
        return 1
    if variant == "as_int":
        return max(int(value).bit_length(), 1)
    if variant == "as_sym_int":
        if "as_int" in value:
            return max(int(value["as_int"]).bit_length(), 1)
        return bits.get(value["as_name"], _SIZE)
    return _SIZE  # getitem's tensors


def _constant(arg: dict[str, Any]) -> int | None:
    ((variant, value),) = arg.items()
    if variant == "as_int":
        return int(value)
    if variant == "as_sym_int" and "as_int" in value:
        return int(value["as_int"])
    return None


def _bound(target: str, bits: list[int], constants: list[int | None]) -> int | None:
    """An upper bound on the bit length of what ``target`` returns; None when there is none."""
    if target == "_operator.getitem" or not bits:
        return _SIZE
    floats = _FLOAT in bits
    if target in _BOOLS:
        return 1
    if target in _TO_FLOAT:
        return _FLOAT
    if target in _TO_INT and floats:
        return 1024  # the largest float is below 2**1024
    if target in _SAME:
        return bits[0]
    if floats:
        return _FLOAT
    if target in _ADDS:
        return max(bits) + 1
    if target == "_operator.mul":
        return sum(bits)
    if target == "_operator.pow":
        exponent = constants[1] if len(constants) > 1 else None
        if exponent is None or exponent > _MAX_EXPONENT:
            return None
        return _FLOAT if exponent < 0 else max(bits[0] * exponent, 1)
    if target in _WIDEST or target in _TO_INT:
        return max(bits)
    return _SIZE

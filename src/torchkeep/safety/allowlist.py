"""What a ``torch.save`` pickle may name, and the code of ours that builds each thing.

Every ``(module, name)`` a pickle may import maps to an entry here: either a
plain value (a dtype) or a :class:`Builder`, a function of ours that checks
its arguments and builds a tensor, a container or a small value. Nothing the
pickle names is ever looked up in Python's import system or called: the name
is only a key into this table.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from torchkeep.safety.limits import MAX_SAME_HASH

__all__ = [
    "GLOBALS",
    "MODULE_ALIASES",
    "Builder",
    "OverLimit",
    "Refusal",
    "StorageRef",
    "StorageType",
    "TensorLimits",
    "TypeMarker",
    "brief",
    "check_keys",
    "is_plain_value",
    "key_hash",
]


class Refusal(Exception):
    """A builder refused its arguments; the interpreter turns it into a typed error."""


class OverLimit(Exception):
    """A builder's input exceeds a :class:`~torchkeep.Limits` bound."""

    def __init__(self, limit: str, value: int, maximum: int) -> None:
        super().__init__(limit)
        self.limit = limit
        self.value = value
        self.maximum = maximum


@dataclass(frozen=True)
class StorageType:
    """A storage class named in a pickle (``torch.FloatStorage`` …): only its dtype matters."""

    name: str
    dtype: torch.dtype
    untyped: bool = False


@dataclass(frozen=True)
class TypeMarker:
    """A class a pickle may name as a type argument but never call (``torch.Tensor``)."""

    name: str


@dataclass
class StorageRef:
    """One loaded storage: its bytes and the dtype its elements are counted in."""

    key: str
    storage: torch.UntypedStorage
    dtype: torch.dtype
    numel: int


@dataclass
class TensorLimits:
    """Counters the builders check (shared with the interpreter).

    ``view_bytes`` sums every tensor's logical size (``numel * itemsize``):
    a stride-0 view of 2**40 elements on a one-element storage costs nothing
    to load but everything to use (``.clone()``, ``.to(dtype)``, a copy into a
    model), so it counts against ``max_bytes`` like stored data does.
    """

    max_numel: int
    max_tensors: int
    tensors: int = 0
    max_bytes: int = 1 << 62
    view_bytes: int = 0


# the largest size, stride or offset a tensor may have (torch stores them as int64)
_INT64_MAX = (1 << 63) - 1
_HASH_MODULUS = sys.hash_info.modulus
# keys are small in real files: ("layer", 0); anything bigger costs time on every lookup
_MAX_KEY_ITEMS = 1024
_MAX_KEY_DEPTH = 16


def brief(value: Any, width: int = 80) -> str:
    """A short description of ``value`` that costs O(width) whatever its size or depth."""
    if isinstance(value, str | bytes | bytearray):
        text = repr(value[: width + 1])
    elif isinstance(value, int) and not isinstance(value, bool):
        text = repr(value) if value.bit_length() <= 256 else f"an int of {value.bit_length()} bits"
    elif isinstance(value, float | complex | bool) or value is None:
        text = repr(value)
    elif isinstance(value, tuple | list | set | frozenset | dict):
        parts: list[str] = []
        for item in value:
            if len(parts) >= 8:
                parts.append("…")
                break
            parts.append(
                brief(item, 16)
                if isinstance(item, str | bytes | int | float | bool) or item is None
                else type(item).__name__
            )
        text = f"{type(value).__name__} of {len(value)} [{', '.join(parts)}]"
    else:
        text = f"a {type(value).__name__}"
    return text if len(text) <= width else text[: width - 1] + "…"


def key_hash(key: Any) -> int | None:
    """The hash of a dict key or set item, or None when it cannot collide by design.

    str and bytes hashes are seeded per process; an int below the hash
    modulus hashes to itself. Every other key (floats, big ints, tuples,
    frozensets, complex numbers) hashes by a public formula, so a file can
    choose many that collide: those are returned for counting.

    Raises:
        Refusal: the key is unhashable, or a tuple/frozenset too big or deep
            to be a real key (hashing it would cost time on every use).
    """
    kind = type(key)
    if kind is str or kind is bytes or key is None or kind is bool:
        return None
    if kind is int and -_HASH_MODULUS < key < _HASH_MODULUS:
        return None
    if kind is tuple or kind is frozenset:
        items = 0
        todo: list[tuple[Any, int]] = [(key, 0)]
        while todo:
            part, depth = todo.pop()
            items += len(part)
            if items > _MAX_KEY_ITEMS or depth >= _MAX_KEY_DEPTH:
                raise Refusal(
                    f"a dict key or set item nested {depth} deep or holding {items} values (keys in "
                    "model files are small)"
                )
            todo.extend((p, depth + 1) for p in part if type(p) is tuple or type(p) is frozenset)
    try:
        return hash(key)
    except TypeError as err:
        raise Refusal(f"an unhashable dict key or set item ({type(key).__name__})") from err


def check_keys(keys: Iterable[Any]) -> None:
    """Refuse keys meant for one dict or set that are unhashable or flood one hash value.

    Raises:
        Refusal: see :func:`key_hash`, or more than ``MAX_SAME_HASH``
            distinct keys with one hash.
    """
    same: dict[int, list[Any]] = {}
    for key in keys:
        h = key_hash(key)
        if h is not None:
            note_hash(same, h, key)


def note_hash(same: dict[int, list[Any]], h: int, key: Any) -> None:
    """Record ``key`` under its hash ``h``; refuse once too many distinct keys share it."""
    seen = same.setdefault(h, [])
    if key in seen:  # at most MAX_SAME_HASH comparisons, of keys bounded by key_hash
        return
    seen.append(key)
    if len(seen) > MAX_SAME_HASH:
        raise Refusal(
            f"more than {MAX_SAME_HASH} distinct dict keys or set items share one hash value "
            "(a hash-flooding file: building the dict would take quadratic time)"
        )


@dataclass(frozen=True)
class Builder:
    """An allowlisted callable: ``build(args, limits)`` makes the value."""

    name: str
    build: Callable[[tuple[Any, ...], TensorLimits], Any]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise Refusal(message)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if type(value) is not tuple or not all(type(v) is int for v in value):
        raise Refusal(f"{what} must be a tuple of ints, got {brief(value)}")
    return value


def _all_ints(values: tuple[Any, ...]) -> bool:
    # a plain loop: a generator in all() cost a microsecond a tensor, twice
    for v in values:  # noqa: SIM110
        if type(v) is not int:
            return False
    return True


def _empty_hooks(value: Any) -> None:
    if value and not (isinstance(value, dict) and not value):
        raise Refusal("tensors with backward hooks are not allowed (torch.save never stores hooks)")


def _empty_state(value: Any) -> None:
    # (dict_state, slots_state) at most: one level, never recursing on what the file built
    parts = value if isinstance(value, tuple) and len(value) == 2 else (value,)
    for part in parts:
        if not (part is None or (isinstance(part, dict) and not part)):
            raise Refusal("a tensor with Python attributes set")


def _tensor(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    dtype: torch.dtype,
    limits: TensorLimits,
) -> torch.Tensor:
    # Checks written out rather than through a helper: this runs once per tensor
    # and building each message eagerly doubled the time per tensor.
    if not isinstance(storage, StorageRef):
        raise Refusal("a tensor rebuilt from something that is not a storage")
    if type(offset) is not int or not 0 <= offset <= _INT64_MAX:
        raise Refusal(f"invalid storage offset {brief(offset, 40)}")
    if type(size) is not tuple or type(stride) is not tuple or not _all_ints(size + stride):
        _ints(size, "size")  # raises the message that names the culprit
        _ints(stride, "stride")
    shape: tuple[int, ...] = size
    strides: tuple[int, ...] = stride
    if len(shape) != len(strides):
        raise Refusal(f"size {brief(shape)} and stride {brief(strides)} differ in length")
    if len(shape) > 64:
        raise Refusal(f"a tensor of {len(shape)} dimensions (torch allows 64)")
    numel = 1
    last = offset
    for d, s in zip(shape, strides, strict=True):
        if d < 0 or s < 0 or s > _INT64_MAX:
            raise Refusal(
                f"negative or overflowing size or stride (size {brief(shape)}, stride {brief(strides)})"
            )
        if d > limits.max_numel:  # also with a zero elsewhere in the shape
            raise OverLimit("max_numel", d, limits.max_numel)
        numel *= d
        last += (d - 1) * s
    if numel > limits.max_numel:
        raise OverLimit("max_numel", numel, limits.max_numel)
    limits.tensors += 1
    if limits.tensors > limits.max_tensors:
        raise OverLimit("max_tensors", limits.tensors, limits.max_tensors)
    itemsize = dtype.itemsize
    limits.view_bytes += numel * itemsize
    if limits.view_bytes > limits.max_bytes:
        raise OverLimit("max_bytes", limits.view_bytes, limits.max_bytes)
    available = storage.storage.nbytes() // itemsize if itemsize else 0
    if numel and last >= available:
        raise Refusal(
            f"a tensor view (offset {offset}, size {brief(shape)}, stride {brief(strides)}) reaches element "
            f"{last}, past the end of its storage of {available} elements"
        )
    if not numel and offset > available:
        raise Refusal(f"a tensor offset {offset} past the end of its storage")
    device = storage.storage.device
    # (a device argument costs a third of the call: CPU tensors go without)
    empty = (
        torch.empty(0, dtype=dtype) if device.type == "cpu" else torch.empty(0, dtype=dtype, device=device)
    )
    return empty.set_(storage.storage, offset, shape, strides)


def _finish(t: torch.Tensor, requires_grad: Any, hooks: Any, metadata: Any) -> torch.Tensor:
    if requires_grad is not False:
        if requires_grad is not True:
            raise Refusal("requires_grad must be a bool")
        if not (t.is_floating_point() or t.is_complex()):
            raise Refusal(f"a {t.dtype} tensor cannot require gradients")
        t.requires_grad_(True)
    if hooks:
        _empty_hooks(hooks)
    if metadata:
        if not (
            isinstance(metadata, dict)
            and set(metadata) <= {"conj", "neg"}
            and all(type(v) is bool for v in metadata.values())
        ):
            raise Refusal(f"unknown tensor metadata {brief(metadata)}")
        if metadata.get("conj") and not t.is_complex():
            raise Refusal("the conjugate bit on a real tensor")
        torch._C._set_tensor_metadata(t, metadata)  # type: ignore[attr-defined]
    return t


def _rebuild_tensor(args: tuple[Any, ...], limits: TensorLimits) -> torch.Tensor:
    _require(len(args) == 4, "_rebuild_tensor takes 4 arguments")
    storage, offset, size, stride = args
    _require(isinstance(storage, StorageRef), "a tensor rebuilt from something that is not a storage")
    return _tensor(storage, offset, size, stride, storage.dtype, limits)


def _rebuild_tensor_v2(args: tuple[Any, ...], limits: TensorLimits) -> torch.Tensor:
    if len(args) == 6:
        storage, offset, size, stride, requires_grad, hooks = args
        metadata = None
    elif len(args) == 7:
        storage, offset, size, stride, requires_grad, hooks, metadata = args
    else:
        raise Refusal("_rebuild_tensor_v2 takes 6 or 7 arguments")
    if not isinstance(storage, StorageRef):
        raise Refusal("a tensor rebuilt from something that is not a storage")
    t = _tensor(storage, offset, size, stride, storage.dtype, limits)
    return _finish(t, requires_grad, hooks, metadata)


def _rebuild_tensor_v3(args: tuple[Any, ...], limits: TensorLimits) -> torch.Tensor:
    _require(len(args) in {7, 8}, "_rebuild_tensor_v3 takes 7 or 8 arguments")
    storage, offset, size, stride, requires_grad, hooks, dtype, *rest = args
    _require(isinstance(dtype, torch.dtype), "_rebuild_tensor_v3 needs a dtype")
    t = _tensor(storage, offset, size, stride, dtype, limits)
    return _finish(t, requires_grad, hooks, rest[0] if rest else None)


def _rebuild_parameter(args: tuple[Any, ...], limits: TensorLimits) -> torch.nn.Parameter:
    _require(len(args) in {3, 4}, "_rebuild_parameter takes 3 or 4 arguments")
    data, requires_grad, hooks, *state = args
    _require(type(data) is torch.Tensor, "a Parameter rebuilt from something that is not a tensor")
    _require(type(requires_grad) is bool, "requires_grad must be a bool")
    _require(not requires_grad or data.is_floating_point() or data.is_complex(), "int Parameter with grad")
    _empty_hooks(hooks)
    if state:
        _empty_state(state[0])
    return torch.nn.Parameter(data, requires_grad)


def _rebuild_from_type_v2(args: tuple[Any, ...], limits: TensorLimits) -> Any:
    _require(len(args) == 4, "_rebuild_from_type_v2 takes 4 arguments")
    func, new_type, inner, state = args
    _require(
        isinstance(func, Builder) and func.name in _TENSOR_BUILDERS, "rebuilds through a non-tensor call"
    )
    _require(new_type == TypeMarker("torch.Tensor"), "rebuilds a tensor subclass")
    _require(isinstance(inner, tuple), "arguments must be a tuple")
    _empty_state(state)
    result = func.build(inner, limits)
    _require(type(result) is torch.Tensor, "rebuilds something other than a tensor")
    return result


def _ordered_dict(args: tuple[Any, ...], limits: TensorLimits) -> collections.OrderedDict[Any, Any]:
    if not args:
        return collections.OrderedDict()
    _require(len(args) == 1 and isinstance(args[0], list), "OrderedDict takes a list of pairs")
    pairs = args[0]
    _require(all(isinstance(p, tuple) and len(p) == 2 for p in pairs), "OrderedDict takes a list of pairs")
    check_keys(p[0] for p in pairs)
    return collections.OrderedDict(pairs)


def _counter(args: tuple[Any, ...], limits: TensorLimits) -> collections.Counter[Any]:
    if not args:
        return collections.Counter()
    _require(len(args) == 1 and type(args[0]) is dict, "Counter takes one dict")
    return collections.Counter(args[0])


def _set(kind: type[set[Any]] | type[frozenset[Any]]) -> Callable[[tuple[Any, ...], TensorLimits], Any]:
    def build(args: tuple[Any, ...], limits: TensorLimits) -> Any:
        if not args:
            return kind()
        _require(len(args) == 1 and isinstance(args[0], list | tuple), f"{kind.__name__} takes a list")
        check_keys(args[0])
        return kind(args[0])

    return build


def _complex(args: tuple[Any, ...], limits: TensorLimits) -> complex:
    _require(
        len(args) in {1, 2} and all(type(a) in {int, float} for a in args), "complex takes one or two numbers"
    )
    try:
        return complex(*args)
    except OverflowError as err:  # complex(10**400): an int no float can hold
        raise Refusal(f"complex of a number too large for a float ({brief(args)})") from err


def _encode(args: tuple[Any, ...], limits: TensorLimits) -> bytes:
    _require(
        len(args) == 2 and isinstance(args[0], str) and args[1] in {"latin1", "latin-1"},
        "_codecs.encode is allowed only as pickle uses it for bytes: encode(str, 'latin1')",
    )
    text: str = args[0]
    try:
        return text.encode("latin1")
    except UnicodeEncodeError as err:
        raise Refusal(f"bytes that are not latin-1 text ({err})") from err


def _bytearray(args: tuple[Any, ...], limits: TensorLimits) -> bytearray:
    _require(len(args) <= 1 and all(isinstance(a, bytes) for a in args), "bytearray takes bytes")
    return bytearray(*args)


def _size(args: tuple[Any, ...], limits: TensorLimits) -> torch.Size:
    _require(len(args) == 1, "torch.Size takes one tuple")
    dims = _ints(args[0], "torch.Size")
    _require(
        len(dims) <= 64 and all(0 <= d <= limits.max_numel for d in dims),
        f"torch.Size with a negative or absurd dimension, or over 64 of them ({brief(dims)})",
    )
    return torch.Size(dims)


def _device(args: tuple[Any, ...], limits: TensorLimits) -> torch.device:
    _require(
        len(args) in {1, 2} and isinstance(args[0], str) and (len(args) == 1 or type(args[1]) is int),
        "torch.device takes a type string and an optional index",
    )
    _require(len(args[0]) <= 64 and args[0].replace(":", "").replace("_", "").isalnum(), "a device name")
    _require(len(args) == 1 or 0 <= args[1] < 1 << 16, "a device index out of range")
    try:
        return torch.device(*args)
    except (RuntimeError, ValueError, OverflowError, TypeError) as err:
        raise Refusal(f"an invalid device {brief(args)}") from err


def _layout(args: tuple[Any, ...], limits: TensorLimits) -> torch.layout:
    _require(args == ("torch.strided",), "only the strided layout is allowed (sparse tensors are not)")
    return torch.strided


_TENSOR_BUILDERS = {
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
}

_STORAGE_TYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
}

_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.complex128,
    torch.complex64,
    torch.complex32,
    torch.float8_e4m3fn,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
]


def _table() -> dict[tuple[str, str], object]:
    table: dict[tuple[str, str], object] = {}
    builders: list[tuple[str, Callable[[tuple[Any, ...], TensorLimits], Any]]] = [
        ("torch._utils._rebuild_tensor", _rebuild_tensor),
        ("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
        ("torch._utils._rebuild_tensor_v3", _rebuild_tensor_v3),
        ("torch._utils._rebuild_parameter", _rebuild_parameter),
        ("torch._utils._rebuild_parameter_with_state", _rebuild_parameter),
        ("torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2),
        ("collections.OrderedDict", _ordered_dict),
        ("collections.Counter", _counter),
        ("builtins.set", _set(set)),
        ("builtins.frozenset", _set(frozenset)),
        ("builtins.complex", _complex),
        ("builtins.bytearray", _bytearray),
        ("_codecs.encode", _encode),
        ("torch.Size", _size),
        ("torch.device", _device),
        ("torch.serialization._get_layout", _layout),
    ]
    for dotted, build in builders:
        module, _, name = dotted.rpartition(".")
        table[(module, name)] = Builder(dotted, build)
    for storage_name, dtype in _STORAGE_TYPES.items():
        table[("torch", storage_name)] = StorageType(storage_name, dtype)
    table[("torch.storage", "UntypedStorage")] = StorageType("UntypedStorage", torch.uint8, untyped=True)
    table[("torch", "UntypedStorage")] = StorageType("UntypedStorage", torch.uint8, untyped=True)
    for dtype in _DTYPES:
        table[("torch", str(dtype).removeprefix("torch."))] = dtype
    table[("torch", "Tensor")] = TypeMarker("torch.Tensor")
    table[("torch.nn.parameter", "Parameter")] = TypeMarker("torch.nn.parameter.Parameter")
    return table


# (module, name) -> a dtype, a StorageType, a TypeMarker or a Builder
GLOBALS: dict[tuple[str, str], object] = _table()

# Python 2 pickles name the builtins module differently
MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

_PLAIN = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    torch.dtype,
    torch.device,
    torch.layout,
)


def is_plain_value(value: object) -> bool:
    """Whether ``value`` is a leaf a loaded file may hold (no containers, tensors or markers)."""
    return isinstance(value, _PLAIN)

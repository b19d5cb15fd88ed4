"""What a ``torch.save`` pickle may name, and the code of ours that builds each thing.

Every ``(module, name)`` a pickle may import maps to an entry here: either a
plain value (a dtype) or a :class:`Builder`, a function of ours that checks
its arguments and builds a tensor, a container or a small value. Nothing the
pickle names is ever looked up in Python's import system or called: the name
is only a key into this table.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

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
    "is_plain_value",
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
    """Counters the builders check (shared with the interpreter)."""

    max_numel: int
    max_tensors: int
    tensors: int = 0


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
        raise Refusal(f"{what} must be a tuple of ints, got {value!r:.80}")
    return value


def _empty_hooks(value: Any) -> None:
    if value and not (isinstance(value, dict) and not value):
        raise Refusal("tensors with backward hooks are not allowed (torch.save never stores hooks)")


def _empty_state(value: Any) -> None:
    if isinstance(value, tuple) and len(value) == 2:
        for part in value:
            _empty_state(part)
        return
    if not (value is None or (isinstance(value, dict) and not value)):
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
    if type(offset) is not int or offset < 0:
        raise Refusal(f"invalid storage offset {offset!r:.40}")
    shape = _ints(size, "size")
    strides = _ints(stride, "stride")
    if len(shape) != len(strides):
        raise Refusal(f"size {list(shape)} and stride {list(strides)} differ in length")
    numel = 1
    last = offset
    for d, s in zip(shape, strides, strict=True):
        if d < 0 or s < 0:
            raise Refusal(f"negative size or stride (size {list(shape)}, stride {list(strides)})")
        numel *= d
        last += (d - 1) * s
    if numel > limits.max_numel:
        raise OverLimit("max_numel", numel, limits.max_numel)
    limits.tensors += 1
    if limits.tensors > limits.max_tensors:
        raise OverLimit("max_tensors", limits.tensors, limits.max_tensors)
    itemsize = dtype.itemsize
    available = storage.storage.nbytes() // itemsize if itemsize else 0
    if numel and last >= available:
        raise Refusal(
            f"a tensor view (offset {offset}, size {list(shape)}, stride {list(strides)}) reaches element "
            f"{last}, past the end of its storage of {available} elements"
        )
    if not numel and offset > available:
        raise Refusal(f"a tensor offset {offset} past the end of its storage")
    return torch.empty((0,), dtype=dtype, device=storage.storage.device).set_(
        storage.storage, offset, shape, strides
    )


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
            raise Refusal(f"unknown tensor metadata {metadata!r:.80}")
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
        return kind(args[0])

    return build


def _complex(args: tuple[Any, ...], limits: TensorLimits) -> complex:
    _require(
        len(args) in {1, 2} and all(type(a) in {int, float} for a in args), "complex takes one or two numbers"
    )
    return complex(*args)


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
    return torch.Size(_ints(args[0], "torch.Size"))


def _device(args: tuple[Any, ...], limits: TensorLimits) -> torch.device:
    _require(
        len(args) in {1, 2} and isinstance(args[0], str) and (len(args) == 1 or type(args[1]) is int),
        "torch.device takes a type string and an optional index",
    )
    _require(len(args[0]) <= 64 and args[0].replace(":", "").replace("_", "").isalnum(), "a device name")
    try:
        return torch.device(*args)
    except (RuntimeError, ValueError) as err:
        raise Refusal(f"an invalid device {args!r}") from err


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

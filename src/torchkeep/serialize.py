"""Any training state as two plain parts: a JSON tree and a flat dict of tensors.

Optimizer, scheduler, scaler, RNG and user states mix tensors with numbers,
strings, tuples, dicts with integer keys, infinities and dtypes. ``flatten``
moves every tensor into a ``dict[str, Tensor]`` (for safetensors) and leaves
a JSON tree that points to them; ``unflatten`` rebuilds the exact original
types. Nothing is pickled, so reading never runs code.
"""

from __future__ import annotations

import base64
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from torchkeep.errors import UnserializableValueError

__all__ = ["flatten", "unflatten"]

_TAG = "__tk__"  # marks an encoded value: {"__tk__": kind, "v": payload}


def _tag(kind: str, value: Any) -> dict[str, Any]:
    return {_TAG: kind, "v": value}


def flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor], where: str = "") -> Any:
    """Encode ``obj`` as JSON-ready data; tensors go to ``tensors`` under ``prefix/...`` keys.

    Raises:
        UnserializableValueError: a value that is neither plain data nor a tensor.
    """
    where = where or prefix
    if isinstance(obj, torch.Tensor):
        key, n = prefix, 1
        while key in tensors:  # two paths that print the same ("a/b" vs "a" → "b")
            key, n = f"{prefix}#{n}", n + 1
        tensors[key] = obj.detach()
        return _tag("tensor", key)
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else _tag("float", repr(float(obj)))
    if isinstance(obj, complex):
        return _tag("complex", [flatten(obj.real, prefix, tensors), flatten(obj.imag, prefix, tensors)])
    if isinstance(obj, bytes | bytearray):
        return _tag("bytes", base64.b64encode(bytes(obj)).decode("ascii"))
    if isinstance(obj, torch.dtype):
        return _tag("dtype", str(obj).removeprefix("torch."))
    if isinstance(obj, torch.device):
        return _tag("device", str(obj))
    if isinstance(obj, torch.Size):
        return _tag("size", list(obj))
    if isinstance(obj, Mapping):
        items = [(k, flatten(v, f"{prefix}/{k}", tensors, f"{where}[{k!r}]")) for k, v in obj.items()]
        if all(isinstance(k, str) for k, _ in items) and _TAG not in obj:
            plain = dict(items)
            return _tag("odict", plain) if isinstance(obj, OrderedDict) else plain
        keys = [flatten(k, f"{prefix}/key", tensors, f"a key of {where}") for k, _ in items]
        return _tag("items", [[k, v] for k, (_, v) in zip(keys, items, strict=True)])
    if isinstance(obj, list | tuple):
        if all(type(v) is int or type(v) is str for v in obj):  # e.g. Python's RNG state: 625 ints
            items = list(obj)
        else:
            items = [flatten(v, f"{prefix}/{i}", tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else _tag("tuple", items)
    if isinstance(obj, set | frozenset):
        return _tag("set", [flatten(v, f"{prefix}/{i}", tensors, f"{where}") for i, v in enumerate(obj)])
    if type(obj).__module__ == "numpy":
        if getattr(obj, "ndim", 0) > 0:
            return flatten(torch.from_numpy(obj.copy()), prefix, tensors, where)
        return flatten(obj.item(), prefix, tensors, where)
    raise UnserializableValueError(where, f"{type(obj).__module__}.{type(obj).__qualname__}")


def unflatten(data: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild what :func:`flatten` encoded.

    Raises:
        KeyError: a tensor the tree points to is missing.
        ValueError: an unknown encoded kind.
    """
    if isinstance(data, list):
        return [unflatten(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if _TAG not in data:
        return {k: unflatten(v, tensors) for k, v in data.items()}
    kind, value = data[_TAG], data["v"]
    if kind == "tensor":
        return tensors[value]
    if kind == "float":
        return float(value)
    if kind == "complex":
        return complex(unflatten(value[0], tensors), unflatten(value[1], tensors))
    if kind == "bytes":
        return base64.b64decode(value)
    if kind == "dtype":
        dtype = getattr(torch, value, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {value!r}")
        return dtype
    if kind == "device":
        return torch.device(value)
    if kind == "size":
        return torch.Size(value)
    if kind == "odict":
        return OrderedDict((k, unflatten(v, tensors)) for k, v in value.items())
    if kind == "items":
        return {_hashable(unflatten(k, tensors)): unflatten(v, tensors) for k, v in value}
    if kind == "tuple":
        return tuple(unflatten(v, tensors) for v in value)
    if kind == "set":
        return {_hashable(unflatten(v, tensors)) for v in value}
    raise ValueError(f"unknown encoded value kind {kind!r}")


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value

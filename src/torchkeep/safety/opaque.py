"""Inert placeholders for objects a pickle would build by running code, and the few we rebuild.

In *opaque* mode the allowlist interpreter does not refuse a name outside the
allowlist: it records it. ``GLOBAL`` of such a name pushes an :class:`Opaque`
that only holds the dotted name; ``REDUCE`` / ``NEWOBJ`` on it make another
:class:`Opaque` holding the arguments, ``BUILD`` stores the state, ``SETITEMS``
and ``APPENDS`` store the items: all as the plain data the pickle built. The
name is never looked up, imported or called, and no ``__reduce__`` or
``__setstate__`` runs. An :class:`Opaque` has no behaviour of its own: it
cannot be called, and pickling it again names torchkeep's class, not the one
in the file.

:func:`rebuild` turns a few well-known *value* types (:data:`VALUE_TYPES`)
back into real values with torchkeep's own code (a ``Namespace`` from its
dict, a ``PurePosixPath`` from its string parts, a ``date`` from its four
bytes); it never calls the class the file names, and it only accepts exactly
the plain data those classes pickle (``str`` parts, ``bytes`` of the right
length, a ``dict`` of ``str`` keys), so a placeholder cannot reach a
constructor that would call a method on it.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

from torchkeep.safety.allowlist import brief

__all__ = ["VALUE_TYPES", "Opaque", "find_opaque", "rebuild"]


@dataclass(eq=False, repr=False)
class Opaque:
    """What a file would have built by running code: the name it gives and the data it holds.

    Nothing named here was imported or called. Compare ``name`` with a
    string (``opaque.name == "argparse.Namespace"``); read the data from the
    attributes.

    Attributes:
        name: the ``module.qualname`` the file names, e.g. ``"pathlib.PosixPath"``.
        how: ``"name"`` (the class or function is only referred to),
            ``"call"`` (the file calls ``name(*args)``; pickle's REDUCE) or
            ``"new"`` (``name.__new__(name, *args, **kwargs)``; NEWOBJ).
        args: the positional arguments, as loaded.
        kwargs: the keyword arguments (NEWOBJ_EX), or None.
        state: what ``__setstate__`` would receive (BUILD; for most classes
            the instance ``__dict__``), or None.
        items: entries the file sets on it (dict subclasses), or None.
        list_items: items the file appends to it (list subclasses), or None.

    Example:
        >>> info = torchkeep.load_checkpoint("lightning.ckpt", model=model)
        >>> info.hyper_parameters["cfg"]
        Opaque(mypkg.config.Cfg.__new__(), state=dict of 2 ['width', 'name'])
        >>> info.hyper_parameters["cfg"].state["width"]
        4
    """

    name: str
    how: str = "name"
    args: tuple[Any, ...] = ()
    kwargs: dict[Any, Any] | None = None
    state: Any = None
    items: dict[Any, Any] | None = None
    list_items: list[Any] | None = None

    def parts(self) -> Iterator[Any]:
        """The data it holds (args, kwargs, state, items, list items), for walking the tree."""
        yield self.args
        for part in (self.kwargs, self.state, self.items, self.list_items):
            if part is not None:
                yield part

    def __repr__(self) -> str:
        if self.how == "name":
            return f"Opaque({self.name})"
        call = f"{self.name}.__new__" if self.how == "new" else self.name
        shown = [brief(a, 30) for a in self.args[:4]] + (["…"] if len(self.args) > 4 else [])
        text = f"Opaque({call}({', '.join(shown)})"
        if self.state is not None:
            text += f", state={brief(self.state, 60)}"
        return text + ")"


def find_opaque(value: Any) -> Iterator[tuple[str, Opaque]]:
    """Every :class:`Opaque` in ``value``, outermost first, with where it is (``"['args'].lr"``).

    ``value`` must be what the interpreter built (``check_structure`` has
    bounded its depth). Each container is visited once, so the references
    back to a parent that omegaconf nodes hold end the walk there.
    """
    seen: set[int] = set()
    todo: list[tuple[str, Any]] = [("", value)]
    while todo:
        where, obj = todo.pop()
        if isinstance(obj, Opaque):
            yield where, obj
        if id(obj) in seen or not isinstance(obj, dict | list | tuple | set | frozenset | Opaque):
            continue
        seen.add(id(obj))
        children: list[tuple[str, Any]]
        if isinstance(obj, dict):
            children = [(f"{where}[{brief(k, 40)}]", v) for k, v in obj.items()]
            children += [(f"{where}<key {brief(k, 40)}>", k) for k in obj if isinstance(k, tuple | Opaque)]
        elif isinstance(obj, Opaque):
            children = [(f"{where}.args", obj.args)]
            if isinstance(obj.state, dict):  # an instance __dict__: its entries read as attributes
                children += [
                    (f"{where}.{k}" if type(k) is str else f"{where}.state[{brief(k, 40)}]", v)
                    for k, v in obj.state.items()
                ]
            elif obj.state is not None:
                children.append((f"{where}.state", obj.state))
            for label, part in (("kwargs", obj.kwargs), ("items", obj.items), ("list_items", obj.list_items)):
                if part is not None:
                    children.append((f"{where}.{label}", part))
        else:
            children = [(f"{where}[{i}]", v) for i, v in enumerate(obj)]
        todo.extend(reversed(children))


def _strings(args: tuple[Any, ...]) -> bool:
    return all(type(a) is str for a in args)


def _namespace(obj: Opaque) -> Any:
    state = obj.state
    if obj.how == "new" and obj.args == () and type(state) is dict and all(type(k) is str for k in state):
        namespace = argparse.Namespace()
        for key, value in state.items():
            setattr(namespace, key, value)  # a plain attribute set: nothing of the value's runs
        return namespace
    return obj


def _path(kind: type[pathlib.PurePath]) -> Callable[[Opaque], Any]:
    def build(obj: Opaque) -> Any:
        if obj.how == "call" and _strings(obj.args) and obj.state is None:
            return kind(*obj.args)
        return obj

    return build


def _one_bytes(obj: Opaque, sizes: tuple[int, ...]) -> bytes | None:
    if obj.how != "call" or obj.state is not None or not 1 <= len(obj.args) <= 2:
        return None
    raw = obj.args[0]
    if type(raw) is not bytes or len(raw) not in sizes:
        return None
    if len(obj.args) == 2 and not isinstance(obj.args[1], datetime.tzinfo):
        return None  # a timezone we could not rebuild stays a placeholder, and so does its value
    return raw


def _tz(obj: Opaque) -> datetime.tzinfo | None:
    return obj.args[1] if len(obj.args) == 2 else None


def _date(obj: Opaque) -> Any:
    raw = _one_bytes(obj, (4,))
    if raw is None or len(obj.args) != 1:
        return obj
    try:
        return datetime.date(raw[0] * 256 + raw[1], raw[2], raw[3])
    except ValueError:
        return obj


def _datetime(obj: Opaque) -> Any:
    # datetime's pickled state: year (2 bytes), month (fold in its top bit), day, hour, minute,
    # second, microsecond (3 bytes), big-endian
    raw = _one_bytes(obj, (10,))
    if raw is None:
        return obj
    try:
        return datetime.datetime(
            raw[0] * 256 + raw[1],
            raw[2] & 0x7F,
            raw[3],
            raw[4],
            raw[5],
            raw[6],
            int.from_bytes(raw[7:10], "big"),
            tzinfo=_tz(obj),
            fold=raw[2] >> 7,
        )
    except ValueError:
        return obj


def _time(obj: Opaque) -> Any:
    raw = _one_bytes(obj, (6,))
    if raw is None:
        return obj
    try:
        return datetime.time(
            raw[0] & 0x7F, raw[1], raw[2], int.from_bytes(raw[3:6], "big"), tzinfo=_tz(obj), fold=raw[0] >> 7
        )
    except ValueError:
        return obj


def _timedelta(obj: Opaque) -> Any:
    if obj.how == "call" and len(obj.args) == 3 and all(type(a) is int for a in obj.args):
        try:
            return datetime.timedelta(*obj.args)
        except OverflowError:
            return obj
    return obj


def _timezone(obj: Opaque) -> Any:
    args = obj.args
    if obj.how != "call" or not 1 <= len(args) <= 2 or type(args[0]) is not datetime.timedelta:
        return obj
    if len(args) == 2 and type(args[1]) is not str:
        return obj
    try:
        return datetime.timezone(*args)
    except ValueError:
        return obj


_REBUILDERS: dict[str, Callable[[Opaque], Any]] = {
    "argparse.Namespace": _namespace,
    "pathlib.PosixPath": _path(pathlib.PurePosixPath),
    "pathlib.PurePosixPath": _path(pathlib.PurePosixPath),
    "pathlib.WindowsPath": _path(pathlib.PureWindowsPath),
    "pathlib.PureWindowsPath": _path(pathlib.PureWindowsPath),
    "datetime.date": _date,
    "datetime.datetime": _datetime,
    "datetime.time": _time,
    "datetime.timedelta": _timedelta,
    "datetime.timezone": _timezone,
}

#: The value types :func:`rebuild` knows (pass any subset as ``rebuild=``).
#: Paths come back as ``PurePosixPath`` / ``PureWindowsPath``: plain values
#: that touch no file system (``pathlib.Path(p)`` makes a concrete one).
VALUE_TYPES: frozenset[str] = frozenset(_REBUILDERS)


def rebuild(value: Any, names: Collection[str]) -> Any:
    """A copy of ``value`` where the placeholders of the types in ``names`` are real values.

    Works bottom-up, so a ``Namespace`` holding a path gets the rebuilt path.
    A placeholder whose data is not exactly what that type pickles (or a
    type not in ``names``) stays a placeholder. Containers are copied only
    where something inside them changed; dict subclasses keep their type.

    Args:
        value: what the interpreter built (depth bounded; cycles only through placeholders).
        names: dotted names from :data:`VALUE_TYPES`.

    Raises:
        ValueError: a name that is not in :data:`VALUE_TYPES`.
    """
    unknown = sorted(set(names) - VALUE_TYPES)
    if unknown:
        raise ValueError(
            f"cannot rebuild {', '.join(unknown)}: torchkeep rebuilds only {', '.join(sorted(VALUE_TYPES))}; "
            "other objects stay inert Opaque placeholders (read their .state and .args)"
        )
    wanted = {name: _REBUILDERS[name] for name in names}
    return _rebuild(value, wanted, {}) if wanted else value


def _rebuild(value: Any, wanted: dict[str, Callable[[Opaque], Any]], done: dict[int, Any]) -> Any:
    key = id(value)
    if key in done:
        return done[key]
    result = value
    if isinstance(value, Opaque):
        done[key] = value  # placeholders may refer back to themselves (omegaconf's _parent): stop there
        args = tuple(_rebuild(a, wanted, done) for a in value.args)
        state = _rebuild(value.state, wanted, done)
        if any(a is not b for a, b in zip(args, value.args, strict=True)) or state is not value.state:
            value = Opaque(value.name, value.how, args, value.kwargs, state, value.items, value.list_items)
        build = wanted.get(value.name)
        result = build(value) if build is not None and not value.kwargs and value.items is None else value
    elif isinstance(value, dict):
        items = [(_rebuild(k, wanted, done), _rebuild(v, wanted, done)) for k, v in value.items()]
        if any(k is not k0 or v is not v0 for (k, v), (k0, v0) in zip(items, value.items(), strict=True)):
            result = type(value)() if type(value) is not dict else {}
            result.update(items)
    elif isinstance(value, list | tuple):
        items = [_rebuild(v, wanted, done) for v in value]
        if any(a is not b for a, b in zip(items, value, strict=True)):
            result = items if isinstance(value, list) else tuple(items)
    done[key] = result
    return result

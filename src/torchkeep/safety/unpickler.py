"""An allowlist pickle interpreter: builds plain values and tensors, calls nothing from the file.

It executes the opcodes ``torch.save`` emits (protocol 2, and 3-5 for files
written with another ``pickle_protocol``) on its own stack. ``GLOBAL`` only
looks a name up in :data:`~torchkeep.safety.allowlist.GLOBALS`; ``REDUCE``
only runs one of our builders; ``BUILD``, ``SETITEM`` and ``APPEND`` only work
on the plain containers they are meant for. Every size (strings, memo, stack
depth, opcodes, tensors) is bounded, and so is what the pickle builds: each
new container, string, dict entry and stack or memo slot is charged at its
estimated size against a budget of ``max_build_ratio`` bytes per byte the
pickle takes in the file (see :class:`~torchkeep.Limits`), before it is made.
Dict and set keys are checked for hash flooding as they are inserted. Any
other opcode is refused.

In *collect* mode (used by ``torchkeep scan``) a refused import or call is
recorded as a :class:`~torchkeep.safety.findings.Finding` and replaced by a placeholder, so one pass
lists everything a file would import or call.

In *opaque* mode (used only by ``load_checkpoint`` for hyper-parameter
entries) a name outside the allowlist becomes an inert
:class:`~torchkeep.safety.opaque.Opaque`, and REDUCE, NEWOBJ, BUILD,
SETITEMS and APPENDS on it record their arguments in it as plain data;
nothing named is imported or called. The caller decides where such
placeholders may be (:func:`~torchkeep.safety.structure.check_structure` with ``opaque=True`` only lets
them through; every other reader refuses them).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CorruptFileError, LimitExceededError, TorchkeepError, UnsafeFileError
from torchkeep.safety.allowlist import (
    GLOBALS,
    MODULE_ALIASES,
    Builder,
    OverLimit,
    Refusal,
    StorageRef,
    StorageType,
    TensorLimits,
    TypeMarker,
    brief,
    key_hash,
    note_hash,
)
from torchkeep.safety.findings import Finding, Placeholder
from torchkeep.safety.limits import BUILD_ALLOWANCE, Limits
from torchkeep.safety.opaque import Opaque
from torchkeep.safety.opcodes import MAX_PROTOCOL, OBJECT_OPS, STRING_OPS, U32, WIDTH_FORMAT, opcode_label

__all__ = ["Collector", "StorageLoader", "Unpickler"]

# (key, dtype, numel, location, view) -> the storage; view is (view_key, offset, size) in legacy files
StorageLoader = Callable[[str, StorageType, int, str, tuple[str, int, int] | None], StorageRef]


class Unpickler:
    """Run one pickle stream with the allowlist.

    Args:
        data: the buffer holding the pickle (bytes, memoryview or mmap).
        path: the file, for error messages.
        member: the zip member (or None for a plain file), for error messages.
        start: where the pickle starts in ``data``.
        storages: builds the storage for a persistent id, or None to refuse them.
        limits: the bounds to enforce.
        collect: record refused imports and calls instead of raising.
        stored_size: the bytes the pickle takes in the file (its compressed
            size when it is a deflated zip member); default: all of ``data``
            after ``start``.
        opaque: build an inert :class:`Opaque` for what the allowlist lacks
            instead of refusing (not with ``collect``).
    """

    def __init__(
        self,
        data: Any,
        *,
        path: Path,
        member: str | None,
        start: int = 0,
        storages: StorageLoader | None,
        limits: Limits,
        collect: bool = False,
        tensor_limits: TensorLimits | None = None,
        stored_size: int | None = None,
        opaque: bool = False,
    ) -> None:
        self._data = data
        self._path = path
        self._member = member
        self._start = start
        self._storages = storages
        self._limits = limits
        self._collect = collect
        self._opaque = opaque and not collect
        self._tensor_limits = tensor_limits or TensorLimits(
            limits.max_numel, limits.max_tensors, max_bytes=limits.max_bytes
        )
        self._stored_size = stored_size
        self.findings: list[Finding] = []
        self.imports: list[str] = []
        self.end = start
        self._stack: list[Any] = []
        # memo indices are 0, 1, 2, ... in what pickle writes: a list (8 bytes a slot);
        # indices past its end (pickletools.optimize leaves gaps) wait in a dict
        self._memo: list[Any] = []
        self._sparse: dict[int, Any] = {}
        # per dict or set being filled: (the container, hash -> distinct colliding keys)
        self._hashes: dict[int, tuple[Any, dict[int, list[Any]]]] = {}
        self._at = start

    # -- errors ---------------------------------------------------------------

    def _corrupt(self, reason: str) -> CorruptFileError:
        return CorruptFileError(
            self._path, f"{reason} (pickle opcode {self._opcode()})", member=self._member, offset=self._at
        )

    def _refuse(self, reason: str, *, globals_: tuple[str, ...] = ()) -> UnsafeFileError:
        return UnsafeFileError(
            self._path,
            globals_,
            reason=reason,
            member=self._member,
            offset=self._at,
            opcode=self._opcode(),
        )

    def _opcode(self) -> str:
        return opcode_label(self._data[self._at]) if self._at < len(self._data) else "none"

    def _limit(self, limit: str, value: int, maximum: int) -> LimitExceededError:
        where = f"member {self._member!r}" if self._member else "the pickle"
        return LimitExceededError(self._path, limit, value, maximum, what=f"{where} at offset {self._at}")

    def _record(self, kind: str, detail: str) -> None:
        self.findings.append(Finding(kind, detail, self._member, self._at))

    # -- the loop -------------------------------------------------------------
    # One function with the opcodes inline: a method call per opcode made the
    # interpreter three times slower, and this loop is what a 2000-tensor
    # file spends most of its load time in.

    def run(self, *, allow_trailing: bool = False) -> Any:
        """Execute the pickle and return the object it builds.

        Args:
            allow_trailing: accept bytes after STOP (the legacy format stores
                several pickles and raw data in a row); ``self.end`` says
                where this pickle ended.
        """
        data = self._data
        size = len(data)
        unpack = struct.unpack_from
        u32 = U32.unpack_from
        lim = self._limits
        max_string, max_depth = lim.max_string, lim.max_depth
        region = size - self._start
        # Each memo entry needs an object made before it (one opcode byte at least) and its
        # own opcode: at most one entry per two bytes.
        max_memo = min(lim.max_memo, region // 2 + 1)
        stored = region if self._stored_size is None else self._stored_size
        budget = max(BUILD_ALLOWANCE, lim.max_build_ratio * stored)
        # Every stack or memo slot comes from an opcode byte: 8 bytes each, charged up front.
        built = 8 * region
        if built > budget:
            raise self._limit("max_build_ratio", built // max(stored, 1), lim.max_build_ratio)
        stack: list[Any] = []
        marks: list[list[Any]] = []
        memo = self._memo
        sparse = self._sparse
        frame_end = size
        pos = self._start
        self._stack = stack
        while True:
            if pos >= frame_end:
                if pos == frame_end and frame_end < size:
                    frame_end = size
                else:
                    self._at = pos
                    raise self._corrupt("the pickle ends without a STOP opcode")
            code = data[pos]
            self._at = pos
            pos += 1
            # Every opcode takes at least one byte, so max_pickle_bytes also bounds the work.
            try:
                if code == 0x72:  # LONG_BINPUT
                    (index,) = u32(data, pos)
                    pos += 4
                    if index == len(memo) and not sparse and index < max_memo:
                        memo.append(stack[-1])
                    else:
                        built += self._put(index, stack[-1], max_memo)
                elif code == 0x68:  # BINGET
                    index = data[pos]
                    pos += 1
                    stack.append(memo[index] if index < len(memo) else self._get(index))
                elif code == 0x71:  # BINPUT
                    index = data[pos]
                    pos += 1
                    if index == len(memo) and not sparse and index < max_memo:
                        memo.append(stack[-1])
                    else:
                        built += self._put(index, stack[-1], max_memo)
                elif code == 0x28:  # MARK
                    if len(marks) >= max_depth:
                        raise self._limit("max_depth", len(marks) + 1, max_depth)
                    marks.append(stack)
                    stack = self._stack = []
                elif code == 0x58:  # BINUNICODE
                    (n,) = u32(data, pos)
                    pos += 4
                    if n > max_string:
                        raise self._limit("max_string", n, max_string)
                    if pos + n > frame_end:
                        raise _Truncated
                    built += 56
                    if built > budget:
                        raise self._over_budget(built, stored)
                    try:
                        stack.append(str(data[pos : pos + n], "utf-8", "surrogatepass"))
                    except UnicodeDecodeError as err:
                        raise self._corrupt(f"a string is not valid UTF-8 ({err})") from err
                    pos += n
                elif code == 0x4D:  # BININT2
                    stack.append(unpack("<H", data, pos)[0])
                    pos += 2
                elif code == 0x74:  # TUPLE
                    items = stack
                    stack = self._stack = marks.pop()
                    stack.append(tuple(items))
                    built += 48
                    if built > budget:
                        raise self._over_budget(built, stored)
                elif code == 0x4B:  # BININT1
                    stack.append(data[pos])
                    pos += 1
                elif code == 0x85:  # TUPLE1
                    stack[-1] = (stack[-1],)
                    built += 48
                    if built > budget:
                        raise self._over_budget(built, stored)
                elif code == 0x52:  # REDUCE
                    args = stack.pop()
                    func = stack.pop()
                    value = self._reduce(func, args)
                    stack.append(value)
                    if type(value) is not torch.Tensor and type(value) is not torch.nn.Parameter:
                        built += _cost(value)
                        if built > budget:
                            raise self._over_budget(built, stored)
                elif code == 0x51:  # BINPERSID
                    stack.append(self._persistent(stack.pop()))
                elif code == 0x89:  # NEWFALSE
                    stack.append(False)
                elif code == 0x29:  # EMPTY_TUPLE
                    stack.append(())
                elif code == 0x75:  # SETITEMS
                    items = stack
                    stack = self._stack = marks.pop()
                    built += _ENTRY * len(items)
                    if built > budget:
                        raise self._over_budget(built, stored)
                    self._set_items(stack, items)
                elif code == 0x6A:  # LONG_BINGET
                    (index,) = u32(data, pos)
                    pos += 4
                    stack.append(memo[index] if index < len(memo) else self._get(index))
                elif code == 0x94:  # MEMOIZE
                    index = len(memo) + len(sparse)
                    if not sparse and index < max_memo:
                        memo.append(stack[-1])
                    else:
                        built += self._put(index, stack[-1], max_memo)
                elif code == 0x4A:  # BININT
                    stack.append(unpack("<i", data, pos)[0])
                    pos += 4
                elif code in STRING_OPS:
                    width, kind = STRING_OPS[code]
                    if width == 1:
                        n = data[pos]
                    else:
                        (n,) = unpack(WIDTH_FORMAT[width], data, pos)
                    pos += abs(width)
                    if n < 0 or n > max_string:
                        raise self._limit("max_string", n, max_string)
                    if pos + n > frame_end:
                        raise _Truncated
                    raw = data[pos : pos + n]
                    pos += n
                    built += 56
                    if built > budget:
                        raise self._over_budget(built, stored)
                    stack.append(self._string(raw, kind))
                elif code == 0x86:  # TUPLE2
                    stack[-2:] = [(stack[-2], stack[-1])]
                    built += 56
                    if built > budget:
                        raise self._over_budget(built, stored)
                elif code == 0x87:  # TUPLE3
                    stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
                    built += 64
                    if built > budget:
                        raise self._over_budget(built, stored)
                elif code == 0x88:  # NEWTRUE
                    stack.append(True)
                elif code == 0x4E:  # NONE
                    stack.append(None)
                elif code == 0x7D:  # EMPTY_DICT
                    built += 64
                    if built > budget:
                        raise self._over_budget(built, stored)
                    stack.append({})
                elif code == 0x5D:  # EMPTY_LIST
                    built += 56
                    if built > budget:
                        raise self._over_budget(built, stored)
                    stack.append([])
                elif code == 0x73:  # SETITEM
                    value = stack.pop()
                    key = stack.pop()
                    built += 2 * _ENTRY
                    if built > budget:
                        raise self._over_budget(built, stored)
                    self._set_items(stack, [key, value])
                elif code == 0x65:  # APPENDS
                    items = stack
                    stack = self._stack = marks.pop()
                    self._append(stack, items)
                elif code == 0x61:  # APPEND
                    self._append(stack, [stack.pop()])
                elif code == 0x63:  # GLOBAL
                    module, pos = self._line(pos, frame_end)
                    name, pos = self._line(pos, frame_end)
                    stack.append(self._lookup(module, name))
                elif code == 0x93:  # STACK_GLOBAL
                    name = stack.pop()
                    module = stack.pop()
                    if type(module) is not str or type(name) is not str:
                        raise self._refuse("names an import with values that are not plain strings")
                    stack.append(self._lookup(module, name))
                elif code == 0x62:  # BUILD
                    state = stack.pop()
                    self._build(stack[-1], state)
                elif code == 0x47:  # BINFLOAT
                    stack.append(unpack(">d", data, pos)[0])
                    pos += 8
                elif code == 0x8A or code == 0x8B:  # LONG1, LONG4
                    if code == 0x8A:
                        n = data[pos]
                        pos += 1
                    else:
                        (n,) = unpack("<i", data, pos)
                        pos += 4
                    if n < 0 or n > 1024:
                        raise self._corrupt(f"an integer of {n} bytes")
                    if pos + n > frame_end:
                        raise _Truncated
                    built += 32 + n
                    stack.append(int.from_bytes(data[pos : pos + n], "little", signed=True))
                    pos += n
                elif code == 0x80:  # PROTO
                    if data[pos] > MAX_PROTOCOL:
                        raise self._corrupt(f"unknown pickle protocol {data[pos]}")
                    pos += 1
                elif code == 0x95:  # FRAME
                    (length,) = unpack("<Q", data, pos)
                    pos += 8
                    if frame_end < size and pos < frame_end:
                        raise self._corrupt("a new frame starts inside the current one")
                    if pos + length > size:
                        raise self._corrupt(f"a frame of {length} bytes runs past the end of the pickle")
                    frame_end = pos + length
                elif code == 0x2E:  # STOP
                    if frame_end < size and pos != frame_end:
                        raise self._corrupt("the pickle stops inside a frame")
                    break
                elif code == 0x30:  # POP
                    stack.pop()
                elif code == 0x31:  # POP_MARK
                    stack = self._stack = marks.pop()
                elif code == 0x32:  # DUP
                    stack.append(stack[-1])
                elif code == 0x6C:  # LIST
                    items = stack
                    stack = self._stack = marks.pop()
                    stack.append(items)
                    built += 56
                    if built > budget:
                        raise self._over_budget(built, stored)
                elif code == 0x64:  # DICT
                    items = stack
                    stack = self._stack = marks.pop()
                    built += 64 + _ENTRY * len(items)
                    if built > budget:
                        raise self._over_budget(built, stored)
                    stack.append({})
                    self._set_items(stack, items)
                elif code == 0x8F:  # EMPTY_SET
                    built += 216
                    if built > budget:
                        raise self._over_budget(built, stored)
                    stack.append(set())
                elif code == 0x91:  # FROZENSET
                    items = stack
                    stack = self._stack = marks.pop()
                    built += 216 + _ENTRY * len(items)
                    if built > budget:
                        raise self._over_budget(built, stored)
                    self._check_keys(items)
                    stack.append(frozenset(items))
                elif code == 0x90:  # ADDITEMS
                    items = stack
                    stack = self._stack = marks.pop()
                    if type(stack[-1]) is not set:
                        raise self._refuse(f"adds set items to a {type(stack[-1]).__name__}")
                    built += _ENTRY * len(items)
                    if built > budget:
                        raise self._over_budget(built, stored)
                    target = stack[-1]
                    for item in items:
                        self._insert_key(target, item)
                        target.add(item)
                elif (code == 0x81 or code == 0x92) and self._opaque:  # NEWOBJ, NEWOBJ_EX
                    kwargs = stack.pop() if code == 0x92 else None
                    args = stack.pop()
                    stack[-1] = self._new_opaque(stack[-1], args, kwargs)
                    built += 96
                    if built > budget:
                        raise self._over_budget(built, stored)
                elif self._collect and code in OBJECT_OPS:
                    stack, pos = self._collect_object(code, stack, marks, pos, frame_end)
                else:
                    raise self._refuse(
                        f"uses pickle opcode {opcode_label(code)}, which torch.save never writes"
                    )
                if pos > frame_end:
                    raise _Truncated
            except _Truncated:
                framed = frame_end < size
                raise self._corrupt(
                    "an opcode runs past the end of its frame" if framed else "the pickle is truncated"
                ) from None
            except (IndexError, struct.error):
                if pos >= frame_end:
                    raise self._corrupt("the pickle is truncated") from None
                raise self._corrupt("the pickle pops from an empty stack or a MARK it never set") from None
            except KeyError:
                raise self._corrupt("the pickle reads a memo entry it never wrote") from None
            except TorchkeepError:
                raise
            except (RecursionError, OverflowError, TypeError, ValueError) as err:
                # Nothing above should raise these for any input; a refusal is still the answer.
                raise self._corrupt(
                    f"the pickle cannot be built ({type(err).__name__}: {brief(str(err))})"
                ) from None
        self.end = pos
        if not allow_trailing and self.end != size:
            raise self._corrupt(f"{size - self.end} bytes follow the end of the pickle")
        if marks or len(stack) != 1:
            raise self._corrupt("the pickle stops with values left on its stack, or with none")
        return stack.pop()

    def _collect_object(
        self, code: int, stack: list[Any], marks: list[list[Any]], pos: int, frame_end: int
    ) -> tuple[list[Any], int]:
        """Collect mode: note an object construction torch.save never writes, and go on past it."""
        if code == 0x81:  # NEWOBJ: cls, args
            stack.pop()
            cls = stack.pop()
        elif code == 0x92:  # NEWOBJ_EX: cls, args, kwargs
            del stack[-2:]
            cls = stack.pop()
        elif code == 0x6F:  # OBJ: MARK cls args...
            items = stack
            stack = self._stack = marks.pop()
            cls = items[0] if items else None
        else:  # INST: MARK args... with the class named inline
            module, pos = self._line(pos, frame_end)
            name, pos = self._line(pos, frame_end)
            cls = self._lookup(module, name)
            stack = self._stack = marks.pop()
        label = (
            cls.name
            if isinstance(cls, Placeholder | TypeMarker | StorageType | Builder)
            else type(cls).__name__
        )
        self._record("call", f"{label}.__new__(…) ({opcode_label(code)})")
        stack.append(Placeholder(label))
        return stack, pos

    # -- memo and budget ---------------------------------------------------------

    def _put(self, index: int, value: Any, max_memo: int) -> int:
        """Store a memo entry off the fast path; return the bytes it adds."""
        memo = self._memo
        if index < len(memo):
            memo[index] = value  # overwriting costs nothing
            return 0
        if index not in self._sparse and len(memo) + len(self._sparse) >= max_memo:
            raise self._limit("max_memo", len(memo) + len(self._sparse) + 1, max_memo)
        if index == len(memo):
            memo.append(value)
            while len(memo) in self._sparse:
                memo.append(self._sparse.pop(len(memo)))
            return 0
        self._sparse[index] = value
        return _ENTRY

    def _get(self, index: int) -> Any:
        return self._sparse[index]  # KeyError: read before written

    def _over_budget(self, built: int, stored: int) -> LimitExceededError:
        ratio = self._limits.max_build_ratio
        where = f"member {self._member!r}" if self._member else "the pickle"
        return LimitExceededError(
            self._path,
            "max_build_ratio",
            -(-built // max(stored, 1)),
            ratio,
            what=f"the objects {where} builds (about {built:,} bytes from {stored:,} stored, "
            f"at offset {self._at})",
        )

    def _string(self, raw: Any, kind: str) -> Any:
        if kind == "bytes":
            return bytes(raw)
        if kind == "bytearray":
            return bytearray(raw)
        try:
            return str(raw, "utf-8", "surrogatepass")
        except UnicodeDecodeError as err:
            raise self._corrupt(f"a string is not valid UTF-8 ({err})") from err

    def _line(self, pos: int, frame_end: int) -> tuple[str, int]:
        limit = min(frame_end, pos + 1024)
        chunk = bytes(self._data[pos:limit])
        newline = chunk.find(b"\n")
        if newline < 0:
            raise self._corrupt("a GLOBAL name is unterminated or longer than 1024 bytes")
        try:
            return chunk[:newline].decode("utf-8"), pos + newline + 1
        except UnicodeDecodeError as err:
            raise self._corrupt(f"a GLOBAL name is not UTF-8 ({err})") from err

    # -- containers -----------------------------------------------------------

    def _insert_key(self, target: Any, key: Any) -> None:
        """Check a key about to go into ``target`` (a dict or set): hashable, small, not a flood."""
        try:
            h = key_hash(key)
        except Refusal as err:
            raise self._corrupt(str(err)) from None
        if h is None:
            return
        entry = self._hashes.get(id(target))
        if entry is None or entry[0] is not target:
            entry = self._hashes[id(target)] = (target, {})
        if key in target:  # the same key again: no new collision (probes bounded by MAX_SAME_HASH)
            return
        try:
            note_hash(entry[1], h, key)
        except Refusal as err:
            raise self._refuse(str(err)) from None

    def _check_keys(self, items: list[Any]) -> None:
        """Keys for a new frozenset: a bad key is a broken pickle, a flood of one hash an attack."""
        same: dict[int, list[Any]] = {}
        for item in items:
            try:
                h = key_hash(item)
            except Refusal as err:
                raise self._corrupt(str(err)) from None
            if h is not None:
                try:
                    note_hash(same, h, item)
                except Refusal as err:
                    raise self._refuse(str(err)) from None

    def _set_items(self, stack: list[Any], items: list[Any]) -> None:
        if len(items) % 2:
            raise self._corrupt("SETITEMS with an odd number of values")
        target = stack[-1]
        if type(target) is Opaque and self._opaque and target.how != "name":
            if target.items is None:
                target.items = {}
            target = target.items
        if type(target) not in (dict, OrderedDict):
            if isinstance(target, Placeholder) and self._collect:
                return
            raise self._refuse(f"sets items on a {type(target).__name__}, which only dicts allow")
        for i in range(0, len(items), 2):
            key = items[i]
            if type(key) is not str:
                self._insert_key(target, key)
            target[key] = items[i + 1]

    def _append(self, stack: list[Any], items: list[Any]) -> None:
        target = stack[-1]
        if type(target) is Opaque and self._opaque and target.how != "name":
            if target.list_items is None:
                target.list_items = []
            target = target.list_items
        if type(target) is not list:
            if isinstance(target, Placeholder) and self._collect:
                return
            raise self._refuse(f"appends to a {type(target).__name__}, which only lists allow")
        target.extend(items)

    # imports and calls

    def _lookup(self, module: str, name: str) -> Any:
        module = MODULE_ALIASES.get(module, module)
        dotted = f"{module}.{name}"
        self.imports.append(dotted)
        found = GLOBALS.get((module, name))
        if found is not None:
            return found
        if self._collect:
            self._record("import", dotted)
            return Placeholder(dotted)
        if self._opaque:
            return Opaque(dotted)
        raise self._refuse(
            f"would import {dotted}, which is not on torchkeep's allowlist", globals_=(dotted,)
        )

    def _reduce(self, func: Any, args: Any) -> Any:
        if type(args) is not tuple:
            raise self._corrupt("REDUCE without an argument tuple")
        if isinstance(func, Builder):
            try:
                return func.build(args, self._tensor_limits)
            except OverLimit as err:
                where = f"member {self._member!r}" if self._member else "the pickle"
                raise LimitExceededError(
                    self._path,
                    err.limit,
                    err.value,
                    err.maximum,
                    what=f"a tensor in {where} at offset {self._at}",
                ) from None
            except Refusal as err:
                if self._collect:
                    self._record("call", f"{func.name}: {err}")
                    return Placeholder(func.name)
                raise self._refuse(f"calls {func.name} with arguments torchkeep refuses: {err}") from None
        if type(func) is Opaque and self._opaque:
            return self._new_opaque(func, args, None, how="call")
        label = func.name if isinstance(func, Placeholder | TypeMarker | StorageType) else type(func).__name__
        if self._collect:
            self._record("call", f"{label}(…)")
            return Placeholder(f"{label}(…)")
        raise self._refuse(f"calls {label}, which is not an allowlisted constructor", globals_=(label,))

    def _build(self, target: Any, state: Any) -> None:
        if type(target) is OrderedDict and isinstance(state, dict):
            for key, value in state.items():
                if type(key) is not str or not key.isidentifier() or key.startswith("__"):
                    raise self._refuse(f"sets the attribute {brief(key)} on a dict")
                if hasattr(OrderedDict, key):
                    # target.values = ... would make every later target.values() fail
                    raise self._refuse(f"sets the attribute {key!r} on a dict, hiding the dict's own {key!r}")
                if key == "_metadata" and not _valid_module_metadata(value):
                    raise self._refuse(
                        "sets a state dict's _metadata to something other than "
                        "{module name: {str: int | bool}} (load_state_dict reads it)"
                    )
                target.__dict__[key] = value
            return
        if isinstance(target, torch.Tensor) and (state is None or state == {}):
            return
        if type(target) is Opaque and self._opaque and target.how != "name":
            if target.state is not None or state is None:
                raise self._refuse(f"sets the state of one {target.name} twice, or to None")
            target.state = state
            return
        if self._collect:
            label = target.name if isinstance(target, Placeholder) else type(target).__name__
            self._record("call", f"{label}.__setstate__(…)")
            return
        raise self._refuse(f"sets the state of a {type(target).__name__}, which torch.save never does")

    def _new_opaque(self, cls: Any, args: Any, kwargs: Any, *, how: str = "new") -> Opaque:
        """Opaque mode: record ``cls(*args)`` (REDUCE) or ``cls.__new__(cls, *args, **kwargs)`` (NEWOBJ)."""
        if type(cls) is not Opaque or cls.how != "name":
            what = f"the result of {cls.name}(…)" if type(cls) is Opaque else type(cls).__name__
            raise self._refuse(f"makes an object by calling {what}, which no pickled class does")
        if type(args) is not tuple or not (kwargs is None or type(kwargs) is dict):
            raise self._corrupt("an object made without an argument tuple (or keyword dict)")
        return Opaque(cls.name, how, args, kwargs)

    def _persistent(self, pid: Any) -> Any:
        if self._storages is None:
            if self._collect:
                self._record("value", "a torch storage outside a torch.save file")
                return Placeholder("storage")
            raise self._refuse("refers to external storage, which only torch.save files may do")
        if not (isinstance(pid, tuple) and len(pid) in {5, 6} and pid[0] == "storage"):
            raise self._corrupt(f"an unknown persistent id {brief(pid)}")
        _, stype, key, location, numel, *view = pid
        if isinstance(stype, Placeholder) and self._collect:
            return Placeholder("storage")
        if not isinstance(stype, StorageType):
            raise self._refuse("a storage of a type that is not a tensor storage")
        if type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
            raise self._corrupt("a malformed storage reference")
        view_meta = view[0] if view else None
        if view_meta is not None and not (
            isinstance(view_meta, tuple)
            and len(view_meta) == 3
            and type(view_meta[0]) is str
            and all(type(v) is int and v >= 0 for v in view_meta[1:])
        ):
            raise self._corrupt("a malformed storage view")
        return self._storages(key, stype, numel, location, view_meta)


def _valid_module_metadata(value: Any) -> bool:
    """What ``nn.Module.state_dict()`` stores as ``_metadata``: per module, ``{"version": int}`` and flags."""
    if not isinstance(value, dict):
        return False
    for name, entry in value.items():
        if type(name) is not str or type(entry) is not dict:
            return False
        if not all(type(k) is str and type(v) in (int, bool) for k, v in entry.items()):
            return False
    return True


# the estimated bytes of one dict entry (hash, key, value, index; dicts grow by 2x)
_ENTRY = 36


def _cost(value: Any) -> int:
    """An estimate of the bytes a builder's result holds beyond the stack slot."""
    if isinstance(value, dict | set | frozenset):
        return 216 + 2 * _ENTRY * len(value)
    if isinstance(value, bytes | bytearray):
        return 64 + len(value)
    return 64


class _Truncated(Exception):
    """An opcode's argument runs past the end of the data or frame."""


# what receives each interpreter after it ran in collect mode (also when it stopped on an error)
Collector = Callable[[Unpickler], None]

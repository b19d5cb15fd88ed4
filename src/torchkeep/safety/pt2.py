"""Vetting a ``torch.export`` archive (``.pt2``) completely before torch reads it.

``torch.export.load`` can unpickle (``weights_only=False``) weights, constants,
opaque and torchbind objects and sample inputs, ``sympy.sympify`` strings,
load AOTInductor shared libraries, and build graphs that call any Python
function; ``.module()`` compiles ``guards_code``. So a ``.pt2`` is read here
first, member by member, against the exact layout ``torch.export.save``
writes in torch 2.14::

    <root>/archive_format                       "pt2"
    <root>/archive_version                      "0"
    <root>/byteorder                            "little"
    <root>/.data/version, .data/serialization_id  digits
    <root>/models/model.json                    the program (torchkeep.safety.pt2_graph)
    <root>/data/weights/model_weights_config.json, data/weights/weight_<N>     raw bytes
    <root>/data/constants/model_constants_config.json, data/constants/tensor_<N>  raw bytes
    <root>/data/sample_inputs/model.pt          a torch.save file (allowlist unpickler)
    <root>/extra/<name>                         UTF-8 text

Anything else (AOTInductor ``.so``/``.cpp``/compile flags, ``use_pickle``
payloads, ``opaque_obj_*`` / ``custom_obj_*`` objects, legacy pickled
weights, unknown members) is refused. A program that passes is then handed
to ``torch.export.load`` as a *rebuilt* archive holding only the vetted
members, JSON re-serialised from what was checked and the sample inputs
left empty, so torch parses exactly what was checked and none of its
unpickling paths (``torch.load``, ``pickle.loads``, ``_pickle_load_obj``)
or AOTInductor loaders is reached.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CorruptFileError, LimitExceededError, UnsafeFileError
from torchkeep.safety.limits import DEFAULT_LIMITS, Limits
from torchkeep.safety.pt2_graph import FQN, check_payload_config, check_program
from torchkeep.safety.unpickler import Finding, Unpickler
from torchkeep.safety.ziparchive import ZipArchive

__all__ = ["VettedProgram", "load_vetted", "scan_pt2", "vet_pt2"]

logger = logging.getLogger(__name__)

MODEL = "model"  # the only program name torch.export.load returns
_ROOT = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_WEIGHT = re.compile(r"weight_[0-9]{1,9}")
_CONSTANT = re.compile(r"tensor_[0-9]{1,9}")
_EXTRA = re.compile(r"extra/[A-Za-z0-9_.\-]{1,128}")
_MAX_FINDINGS = 200
# element sizes of the schema's ScalarType values (torch/_export/serde/schema.py)
_ITEMSIZE = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 2,
    7: 4,
    8: 8,
    9: 4,
    10: 8,
    11: 16,
    12: 1,
    13: 2,
    28: 2,
    29: 1,
    30: 1,
    31: 1,
    32: 1,
    33: 1,
    34: 4,
    35: 8,
}
_FIXED = {"archive_format": b"pt2", "archive_version": b"0", "byteorder": b"little"}
_WEIGHTS_CONFIG = f"data/weights/{MODEL}_weights_config.json"
_CONSTANTS_CONFIG = f"data/constants/{MODEL}_constants_config.json"
_PROGRAM = f"models/{MODEL}.json"
_SAMPLE_INPUTS = f"data/sample_inputs/{MODEL}.pt"


@dataclass
class VettedProgram:
    """A ``.pt2`` archive that passed every check, ready for :func:`load_vetted`.

    Attributes:
        path: the file.
        documents: the checked JSON documents, by member name (relative to the root).
        payloads: names (relative to the root) of the raw tensor members to copy.
        findings: what was refused (empty for a vetted program; filled in collect mode).
    """

    path: Path
    documents: dict[str, Any] = field(default_factory=dict)
    payloads: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


class _Vetter:
    def __init__(self, path: Path, archive: ZipArchive, limits: Limits, *, collect: bool) -> None:
        self.path = path
        self.archive = archive
        self.limits = limits
        self.collect = collect
        self.result = VettedProgram(path)
        self.root = ""

    # -- reporting -------------------------------------------------------------

    def refuse(
        self,
        kind: str,
        detail: str,
        member: str | None,
        globals_: list[str] | None = None,
        *,
        message: str | None = None,
    ) -> None:
        if not self.collect:
            detail = message or detail
            fix = (
                " torchkeep loads only plain torch.export programs of aten operators and tensors; if you "
                "trust where the file came from, pass trust=True (torch.export.load then reads it as it is)"
            )
            raise UnsafeFileError(
                self.path, globals_ or (), reason=f"is a .pt2 that {detail};{fix}", member=member
            )
        if len(self.result.findings) < _MAX_FINDINGS:
            self.result.findings.append(Finding(kind, detail, member, 0))

    def full(self, member: str) -> str:
        return f"{self.root}/{member}"

    def read(self, name: str, max_size: int) -> bytes:
        member = self.archive.member(self.full(name))
        if member.size > max_size:
            limit = "max_header_bytes" if max_size == self.limits.max_header_bytes else "max_pickle_bytes"
            raise LimitExceededError(self.path, limit, member.size, max_size, what=f"member {name!r}")
        return self.archive.read(self.full(name))

    def json(self, name: str) -> Any:
        data = self.read(name, self.limits.max_header_bytes)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise CorruptFileError(
                self.path, f"{name} is not UTF-8 text ({err})", member=self.full(name)
            ) from err
        depth = _max_depth(text)
        if depth > self.limits.max_depth:
            self.refuse(
                "structure",
                f"has a JSON document nested {depth} deep (limit max_depth={self.limits.max_depth})",
                self.full(name),
            )
            return None
        try:
            return json.loads(text, object_pairs_hook=_unique_keys)
        except _DuplicateKey as err:
            self.refuse(
                "structure",
                f"has the key {err.key[:60]!r} twice in one JSON object (two readers "
                "would see different values)",
                self.full(name),
            )
            return None
        except ValueError as err:
            raise CorruptFileError(
                self.path, f"{name} is not valid JSON ({err})", member=self.full(name)
            ) from err

    # -- the archive -------------------------------------------------------------

    def members(self) -> dict[str, str]:
        names = list(self.archive.members)
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            self.refuse(
                "member", f"does not keep all members in one folder (found {sorted(roots)[:5]})", None
            )
        self.root = next(iter(sorted(roots)))
        if not _ROOT.fullmatch(self.root):
            self.refuse("member", f"has the folder name {self.root[:60]!r}", None)
        folded: dict[str, str] = {}
        kinds: dict[str, str] = {}
        for full in names:
            if "/" not in full:
                continue
            name = full.split("/", 1)[1]
            twin = folded.setdefault(name.casefold(), full)
            if twin != full:
                self.refuse(
                    "member",
                    f"holds {twin!r} and {full!r}, names that differ only in case (they "
                    "are one file on Windows and macOS)",
                    full,
                )
                continue
            kinds[name] = self.classify(name, full)
        return kinds

    def classify(self, name: str, full: str) -> str:
        base = name.rsplit("/", 1)[-1]
        if name.startswith("data/aotinductor/") or base.endswith((".so", ".dll", ".dylib", ".pyd")):
            self.refuse(
                "native code",
                f"holds AOTInductor / native code {name!r} (loading it runs machine code)",
                full,
            )
        elif (
            base.endswith((".cpp", ".c", ".h", ".cu", ".py"))
            or "compile_flags" in base
            or "linker_flags" in base
        ):
            self.refuse(
                "native code",
                f"holds source or build flags {name!r} (torch would compile and load them)",
                full,
            )
        elif name.startswith(("data/executorch/", "data/mtia", "xl_model_weights/")):
            self.refuse("member", f"holds {name!r}, a backend package torchkeep does not load", full)
        elif name.startswith("data/constants/") and base.startswith(("opaque_obj_", "custom_obj_")):
            self.refuse(
                "pickle",
                f"holds the Python / torchbind object {name!r} (torch unpickles it with "
                "pickle.loads or torch's object loader)",
                full,
            )
        elif name in {f"data/weights/{MODEL}.pt", f"data/constants/{MODEL}.pt"}:
            self.refuse(
                "pickle", f"holds legacy pickled tensors {name!r} (torch.load(weights_only=False))", full
            )
        elif name in _FIXED or name in {".data/version", ".data/serialization_id"}:
            return "fixed"
        elif name in {_PROGRAM, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG}:
            return "json"
        elif name == _SAMPLE_INPUTS:
            return "sample"
        elif name.startswith("data/weights/") and _WEIGHT.fullmatch(base) and name.count("/") == 2:
            return "weight"
        elif name.startswith("data/constants/") and _CONSTANT.fullmatch(base) and name.count("/") == 2:
            return "constant"
        elif _EXTRA.fullmatch(name):
            return "extra"
        elif name.startswith("models/"):
            self.refuse(
                "member", f"holds a second program {name!r} (torch.export.load reads only {_PROGRAM!r})", full
            )
        else:
            self.refuse("member", f"holds the unknown member {name!r}", full)
        return "refused"

    def fixed(self, name: str) -> None:
        data = self.read(name, 64)
        if name in _FIXED:
            if data != _FIXED[name]:
                self.refuse("value", f"says {name} = {data[:20]!r}, not {_FIXED[name]!r}", self.full(name))
        elif not re.fullmatch(rb"[0-9]{1,64}\n?", data):
            raise CorruptFileError(self.path, f"{name} is not a number", member=self.full(name))

    # -- tensors -----------------------------------------------------------------

    def payload_config(
        self, name: str, directory: str, pattern: re.Pattern[str], kinds: dict[str, str]
    ) -> None:
        doc = self.json(name)
        if doc is None:
            return
        full = self.full(name)
        problems: list[str] = []

        def problem(kind: str, detail: str) -> None:
            problems.append(detail)
            self.refuse(kind, f"has {detail}", full)

        check_payload_config(doc, name, problem)
        if problems:
            return
        config = doc["config"]
        self.result.documents[name] = doc
        seen: dict[str, tuple[int, Any]] = {}
        for fqn, meta in config.items():
            if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
                continue
            where = f"{name}[{fqn[:60]!r}]"
            if not FQN.fullmatch(fqn) or any(p.startswith("__") for p in fqn.split(".")):
                self.refuse("name", f"names a tensor {fqn[:60]!r} that is not a dotted attribute name", full)
            target = meta["path_name"]
            member = f"{directory}{target}"
            if meta.get("use_pickle") is True:
                self.pickled(
                    member,
                    f"{where} has use_pickle=true: torch would torch.load(weights_only=False) {member!r}",
                    kinds,
                )
                continue
            if not pattern.fullmatch(target) or kinds.get(member) is None:
                self.refuse(
                    "member",
                    f"{where} points to {target[:60]!r}, which is not one of its tensor records",
                    full,
                )
                continue
            tensor = meta.get("tensor_meta")
            if isinstance(tensor, dict):
                self.check_tensor(where, member, tensor, seen)

    def pickled(self, member: str, detail: str, kinds: dict[str, str]) -> None:
        globals_: list[str] = []
        if kinds.get(member):
            globals_ = self.pickle_imports(member)
        self.refuse(
            "pickle",
            detail + (f" (it would import {', '.join(globals_[:5])})" if globals_ else ""),
            self.full(member),
            globals_,
        )
        kinds[member] = "pickled"

    def pickle_imports(self, member: str) -> list[str]:
        """What the pickle in ``member`` would import (the allowlist interpreter collects, builds nothing)."""
        from torchkeep.safety.torchfile import scan_torch_stream

        data = self.read(member, self.limits.max_pickle_bytes)
        seen: list[str] = []

        def note(unpickler: Unpickler) -> None:
            seen.extend(f.detail for f in unpickler.findings if f.kind == "import")

        # only the names matter here: the member is refused whatever else is wrong with it
        with contextlib.suppress(UnsafeFileError, CorruptFileError, LimitExceededError):
            scan_torch_stream(self.path, io.BytesIO(data), len(data), limits=self.limits, collect=note)
        return list(dict.fromkeys(seen))

    def check_tensor(
        self, where: str, member: str, meta: dict[str, Any], seen: dict[str, tuple[int, Any]]
    ) -> None:
        full = self.full(member)
        ints = [meta["storage_offset"], *meta["sizes"], *meta["strides"]]
        if not all(isinstance(v, dict) and set(v) == {"as_int"} for v in ints):
            self.refuse(
                "expression",
                f"{where} has a symbolic size, stride or offset (a stored tensor has fixed ones)",
                full,
            )
            return
        offset = meta["storage_offset"]["as_int"]
        sizes = [v["as_int"] for v in meta["sizes"]]
        strides = [v["as_int"] for v in meta["strides"]]
        dtype = meta["dtype"]
        key = (dtype, meta["device"].get("type"))
        if seen.setdefault(member, (dtype, key))[1] != key:
            raise CorruptFileError(
                self.path,
                f"{where}: {member!r} is shared with a tensor of another dtype or device",
                member=full,
            )
        if (
            len(sizes) != len(strides)
            or offset < 0
            or any(s < 0 for s in sizes)
            or any(s < 0 for s in strides)
        ):
            raise CorruptFileError(
                self.path, f"{where} has an invalid shape {sizes} / strides {strides}", member=full
            )
        numel = 1
        for s in sizes:
            numel *= s
        if numel > self.limits.max_numel:
            raise LimitExceededError(self.path, "max_numel", numel, self.limits.max_numel, what=where)
        itemsize = _ITEMSIZE[dtype]
        record = self.archive.member(full).size
        if record % itemsize:
            raise CorruptFileError(
                self.path,
                f"{member!r} holds {record} bytes, not a whole number of {itemsize}-byte elements",
                member=full,
            )
        if numel and record:
            needed = (offset + sum((n - 1) * st for n, st in zip(sizes, strides, strict=True)) + 1) * itemsize
            if needed > record:
                raise CorruptFileError(
                    self.path,
                    f"{where} declares {sizes} (strides {strides}, offset {offset}), "
                    f"which needs {needed} bytes, but {member!r} holds {record}",
                    member=full,
                )
        elif numel and not record:
            raise CorruptFileError(self.path, f"{where} declares data but {member!r} is empty", member=full)

    # -- the whole archive ---------------------------------------------------------

    def run(self) -> VettedProgram:
        kinds = self.members()
        for required in (
            *_FIXED,
            ".data/version",
            _PROGRAM,
            _WEIGHTS_CONFIG,
            _CONSTANTS_CONFIG,
            _SAMPLE_INPUTS,
        ):
            if required not in kinds:
                raise CorruptFileError(
                    self.path, f"the .pt2 archive has no {required!r} record", member=self.full(required)
                )
        total = 0
        for name, kind in kinds.items():
            if kind == "fixed":
                self.fixed(name)
            elif kind in {"weight", "constant"}:
                total += self.archive.member(self.full(name)).size
            elif kind == "extra":
                try:
                    self.read(name, self.limits.max_header_bytes).decode("utf-8")
                except UnicodeDecodeError as err:
                    raise CorruptFileError(
                        self.path, f"{name} is not UTF-8 text", member=self.full(name)
                    ) from err
        if total > self.limits.max_bytes:
            raise LimitExceededError(self.path, "max_bytes", total, self.limits.max_bytes, what="tensor data")
        self.payload_config(_WEIGHTS_CONFIG, "data/weights/", _WEIGHT, kinds)
        self.payload_config(_CONSTANTS_CONFIG, "data/constants/", _CONSTANT, kinds)
        referenced = {
            f"{d}{meta['path_name']}"
            for name, d in ((_WEIGHTS_CONFIG, "data/weights/"), (_CONSTANTS_CONFIG, "data/constants/"))
            for meta in self.result.documents.get(name, {}).get("config", {}).values()
            if isinstance(meta, dict) and isinstance(meta.get("path_name"), str)
        }
        for name, kind in kinds.items():
            if kind in {"weight", "constant"}:
                if name in referenced:
                    self.result.payloads.append(name)
                else:
                    self.refuse("member", f"holds {name!r}, which no config refers to", self.full(name))
        program = self.json(_PROGRAM)
        if program is not None:
            full = self.full(_PROGRAM)
            check_program(program, lambda kind, detail: self.refuse(kind, f"has {detail}", full))
            self.result.documents[_PROGRAM] = program
        self.sample_inputs()
        return self.result

    def sample_inputs(self) -> None:
        from torchkeep.safety.torchfile import scan_torch_stream

        full = self.full(_SAMPLE_INPUTS)
        data = self.read(_SAMPLE_INPUTS, self.limits.max_pickle_bytes)
        if not data:
            return
        found: list[Finding] = []

        def note(unpickler: Unpickler) -> None:
            found.extend(unpickler.findings)

        try:
            scan_torch_stream(self.path, io.BytesIO(data), len(data), limits=self.limits, collect=note)
        except UnsafeFileError as err:
            found.append(Finding("structure", err.reason, full, err.offset or 0))
        except CorruptFileError as err:
            raise CorruptFileError(
                self.path, f"the sample inputs are damaged: {err.reason}", member=full
            ) from err
        for f in found:
            if f.kind == "import":
                # the finding names the import, as scan's findings for any pickle do
                self.refuse(
                    "import",
                    f.detail,
                    full,
                    [f.detail],
                    message=f"has sample inputs whose pickle would import {f.detail}",
                )
            else:
                self.refuse(f.kind, f"has sample inputs whose pickle {f.detail}", full)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _max_depth(text: str) -> int:
    """How deeply brackets nest in a JSON text (outside strings), without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def vet_pt2(path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS) -> VettedProgram:
    """Check a ``.pt2`` archive completely; return it vetted or raise at the first problem.

    Args:
        path (str | PathLike): the archive.
        limits (Limits): bounds checked before anything is allocated.

    Returns:
        A :class:`VettedProgram` for :func:`load_vetted`.

    Raises:
        UnsafeFileError: something torch would unpickle, evaluate, compile or
            load as native code, a call outside the allowlist, or a member or
            field outside the schema; ``member`` names where.
        CorruptFileError: the archive is damaged (sizes that lie, bad JSON).
        LimitExceededError: a member or document exceeds ``limits``.

    Example:
        >>> program = load_vetted(vet_pt2("model.pt2"))
    """
    p = Path(path)
    with p.open("rb") as f:
        archive = ZipArchive(p, f, p.stat().st_size, limits=limits)
        return _Vetter(p, archive, limits, collect=False).run()


def scan_pt2(
    path: Path, archive: ZipArchive, *, limits: Limits = DEFAULT_LIMITS, into: list[Finding] | None = None
) -> list[Finding]:
    """Every refused construct of a ``.pt2`` archive, as findings (``scan``'s collect mode).

    Args:
        path (Path): the file (for messages).
        archive (ZipArchive): its checked table of contents, open on the file.
        limits (Limits): the same bounds the loaders enforce.
        into (list | None, default None): a list to append the findings to as
            they are found, so they survive a :class:`CorruptFileError` raised later.

    Returns:
        The findings (``into`` when given).

    Raises:
        CorruptFileError, LimitExceededError: as :func:`vet_pt2`.
    """
    vetter = _Vetter(path, archive, limits, collect=True)
    if into is not None:
        vetter.result.findings = into
    return vetter.run().findings


def load_vetted(program: VettedProgram, *, limits: Limits = DEFAULT_LIMITS) -> torch.export.ExportedProgram:
    """Hand a vetted program to ``torch.export.load``: a rebuilt archive of the checked members only.

    The JSON documents are written back from the checked values, the raw
    tensor records are copied (CRC-checked), the sample inputs are left empty
    (so torch unpickles nothing; ``example_inputs`` of the result is None)
    and extra files are dropped. The copy costs memory once the size of the
    weights while torch reads it.

    Returns:
        The ``torch.export.ExportedProgram``.

    Raises:
        CorruptFileError: torch cannot read the program (a wrong schema
            version, an inconsistent graph).
    """
    if program.findings:
        raise ValueError("load_vetted takes a program from vet_pt2, not from scan_pt2")
    buffer = io.BytesIO()
    path = program.path
    with path.open("rb") as f, zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as out:
        archive = ZipArchive(path, f, path.stat().st_size, limits=limits)
        root = next(iter(archive.members)).split("/", 1)[0]
        for name, value in _FIXED.items():
            out.writestr(f"archive/{name}", value)
        out.writestr("archive/.data/version", archive.read(f"{root}/.data/version"))
        for name, doc in program.documents.items():
            out.writestr(f"archive/{name}", json.dumps(doc))
        out.writestr(f"archive/{_SAMPLE_INPUTS}", b"")
        for name in program.payloads:
            out.writestr(f"archive/{name}", archive.read(f"{root}/{name}"))
    buffer.seek(0)
    try:
        return torch.export.load(buffer)
    except Exception as err:  # a damaged program fails in many ways inside torch
        raise CorruptFileError(path, f"the torch.export program cannot be read ({str(err)[:300]})") from err

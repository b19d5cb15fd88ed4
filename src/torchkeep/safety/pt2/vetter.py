"""Vetting a ``.pt2`` archive member by member (:func:`vet_pt2`, :func:`scan_pt2`).

One pass over one read of the file: the layout (:mod:`.members`), the JSON
documents (:mod:`.schema`), the tensor records against their declared
shapes, and the sample inputs through the allowlist unpickler. In
:func:`vet_pt2` the first problem raises and the bytes read are kept for the
rebuilt archive (:mod:`.rebuild`); in :func:`scan_pt2` every problem becomes
a finding and no tensor data is read.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from torchkeep.errors import CorruptFileError, LimitExceededError, UnsafeFileError
from torchkeep.safety.findings import Finding
from torchkeep.safety.limits import DEFAULT_LIMITS, Limits
from torchkeep.safety.pt2.members import (
    CONSTANT,
    CONSTANTS_CONFIG,
    FIXED,
    PROGRAM,
    ROOT,
    SAMPLE_INPUTS,
    WEIGHT,
    WEIGHTS_CONFIG,
    DuplicateKey,
    check_record,
    classify,
    max_depth,
    unique_keys,
)
from torchkeep.safety.pt2.rebuild import VettedProgram, build_archive
from torchkeep.safety.pt2.schema import FQN, check_payload_config, check_program
from torchkeep.safety.unpickler import Unpickler
from torchkeep.safety.ziparchive import ZipArchive

__all__ = ["scan_pt2", "vet_pt2"]

logger = logging.getLogger(__name__)

_MAX_FINDINGS = 200


class _Vetter:
    def __init__(self, path: Path, archive: ZipArchive, limits: Limits, *, collect: bool) -> None:
        # collect: scan's mode, every problem a finding; else raise at the first and keep the bytes
        # read (tensor records, .data/version) for the rebuilt archive
        self.kept: dict[str, bytes] = {}
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
        depth = max_depth(text)
        if depth > self.limits.max_depth:
            self.refuse(
                "structure",
                f"has a JSON document nested {depth} deep (limit max_depth={self.limits.max_depth})",
                self.full(name),
            )
            return None
        try:
            return json.loads(text, object_pairs_hook=unique_keys)
        except DuplicateKey as err:
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
        if not ROOT.fullmatch(self.root):
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
        kind, refusal = classify(name, stored=self.archive.member(full).stored)
        if kind == "second program":
            refusal = (
                "member",
                f"holds a second program {name!r} (torch.export.load reads only {PROGRAM!r})",
            )
        elif kind == "unknown":
            refusal = ("member", f"holds the unknown member {name!r}")
        if refusal is not None:
            self.refuse(*refusal, full)
            return "refused"
        return kind

    def fixed(self, name: str) -> None:
        data = self.read(name, 64)
        if not self.collect:
            self.kept[name] = data
        if name in FIXED:
            if data != FIXED[name]:
                self.refuse("value", f"says {name} = {data[:20]!r}, not {FIXED[name]!r}", self.full(name))
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
        record = self.archive.member(full).size
        if not check_record(self.path, where, member, full, meta, record, seen, self.limits):
            self.refuse(
                "expression",
                f"{where} has a symbolic size, stride or offset (a stored tensor has fixed ones)",
                full,
            )

    # -- the whole archive ---------------------------------------------------------

    def run(self) -> VettedProgram:
        kinds = self.members()
        for required in (
            *FIXED,
            ".data/version",
            PROGRAM,
            WEIGHTS_CONFIG,
            CONSTANTS_CONFIG,
            SAMPLE_INPUTS,
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
        self.payload_config(WEIGHTS_CONFIG, "data/weights/", WEIGHT, kinds)
        self.payload_config(CONSTANTS_CONFIG, "data/constants/", CONSTANT, kinds)
        referenced = {
            f"{d}{meta['path_name']}"
            for name, d in ((WEIGHTS_CONFIG, "data/weights/"), (CONSTANTS_CONFIG, "data/constants/"))
            for meta in self.result.documents.get(name, {}).get("config", {}).values()
            if isinstance(meta, dict) and isinstance(meta.get("path_name"), str)
        }
        for name, kind in kinds.items():
            if kind in {"weight", "constant"}:
                if name in referenced:
                    self.result.payloads.append(name)
                    if not self.collect:
                        # read once, CRC-checked: the rebuilt archive holds these very bytes
                        self.kept[name] = self.archive.read(self.full(name))
                else:
                    self.refuse("member", f"holds {name!r}, which no config refers to", self.full(name))
        program = self.json(PROGRAM)
        if program is not None:
            full = self.full(PROGRAM)
            check_program(program, lambda kind, detail: self.refuse(kind, f"has {detail}", full))
            self.result.documents[PROGRAM] = program
        self.sample_inputs()
        return self.result

    def sample_inputs(self) -> None:
        from torchkeep.safety.torchfile import scan_torch_stream

        full = self.full(SAMPLE_INPUTS)
        data = self.read(SAMPLE_INPUTS, self.limits.max_pickle_bytes)
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


def vet_pt2(path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS) -> VettedProgram:
    """Check a ``.pt2`` archive completely; return it vetted or raise at the first problem.

    Args:
        path (str | PathLike): the archive.
        limits (Limits): bounds checked before anything is allocated.

    Returns:
        A :class:`VettedProgram` for :func:`load_vetted`, holding the rebuilt
        archive (about the size of the file).

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
        # one open file, each byte read once: what is rebuilt is what was checked
        archive = ZipArchive(p, f, os.fstat(f.fileno()).st_size, limits=limits)
        vetter = _Vetter(p, archive, limits, collect=False)
        program = vetter.run()
    program.archive = build_archive(program, vetter.kept)
    return program


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

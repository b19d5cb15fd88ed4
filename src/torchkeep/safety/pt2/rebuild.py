"""The rebuilt archive ``torch.export.load`` reads: only vetted members, from the bytes that were vetted.

The JSON documents are written back from the checked values, the tensor
records and ``.data/version`` are the very bytes :func:`~.vetter.vet_pt2`
read and checked (the file is read once: a file changed after vetting
changes nothing), the sample inputs are left empty (so torch unpickles
nothing; ``example_inputs`` of the result is None) and extra files are
dropped.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CorruptFileError
from torchkeep.safety.findings import Finding
from torchkeep.safety.limits import DEFAULT_LIMITS, Limits
from torchkeep.safety.pt2.members import FIXED, SAMPLE_INPUTS

__all__ = ["VettedProgram", "build_archive", "load_vetted"]


@dataclass
class VettedProgram:
    """A ``.pt2`` archive that passed every check, ready for :func:`load_vetted`.

    Attributes:
        path: the file.
        documents: the checked JSON documents, by member name (relative to the root).
        payloads: names (relative to the root) of the raw tensor records.
        findings: what was refused (empty for a vetted program; filled in collect mode).
        archive: the rebuilt archive (empty from ``scan_pt2``), built from the
            bytes that were checked.
    """

    path: Path
    documents: dict[str, Any] = field(default_factory=dict)
    payloads: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    archive: bytes = field(default=b"", repr=False)


def build_archive(program: VettedProgram, kept: dict[str, bytes]) -> bytes:
    """A zip of the checked documents and the ``kept`` bytes (tensor records, ``.data/version``)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as out:
        for name, value in FIXED.items():
            out.writestr(f"archive/{name}", value)
        out.writestr("archive/.data/version", kept[".data/version"])
        for name, doc in program.documents.items():
            out.writestr(f"archive/{name}", json.dumps(doc))
        out.writestr(f"archive/{SAMPLE_INPUTS}", b"")
        for name in program.payloads:
            out.writestr(f"archive/{name}", kept.pop(name))  # pop: each record is held once
    # getvalue shares the buffer's bytes once the BytesIO is gone: no second copy
    return buffer.getvalue()


def load_vetted(program: VettedProgram, *, limits: Limits = DEFAULT_LIMITS) -> torch.export.ExportedProgram:
    """Hand a vetted program to ``torch.export.load``: its rebuilt archive, never the file again.

    Args:
        program (VettedProgram): from :func:`~torchkeep.safety.pt2.vet_pt2`.
        limits (Limits): unused (the bounds were checked by ``vet_pt2``); kept
            so that every loader takes ``limits``.

    Returns:
        The ``torch.export.ExportedProgram``.

    Raises:
        ValueError: ``program`` comes from ``scan_pt2`` (it has findings and no archive).
        CorruptFileError: torch cannot read the program (a wrong schema
            version, an inconsistent graph).

    Example:
        >>> exported = load_vetted(vet_pt2("model.pt2"))
    """
    del limits
    if program.findings or not program.archive:
        raise ValueError("load_vetted takes a program from vet_pt2, not from scan_pt2")
    try:
        return torch.export.load(io.BytesIO(program.archive))
    except Exception as err:  # a damaged program fails in many ways inside torch
        raise CorruptFileError(
            program.path, f"the torch.export program cannot be read ({str(err)[:300]})"
        ) from err

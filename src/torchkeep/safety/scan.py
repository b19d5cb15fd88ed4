"""``torchkeep scan``: what a model file would import or call, decided by the loader's own code.

Scanners that re-implement a pickle parser beside the real loader disagree
with it in exactly the places attackers aim at. This scan runs the very
interpreter :func:`~torchkeep.load_weights` uses, in *collect* mode with
tensors on the meta device (no data read, nothing allocated), so SAFE means
"torchkeep loads this without running code" and UNSAFE lists every refused
import and call with its member and offset.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchkeep.errors import (
    CorruptFileError,
    LimitExceededError,
    TorchkeepError,
    UnsafeFileError,
    UnsupportedFormatError,
    first_line,
)
from torchkeep.formats import detect as detection

# modules, not names: torchkeep.formats imports the readers of this package while it loads
from torchkeep.formats import numpy as npy_format
from torchkeep.formats import safetensors as st_format
from torchkeep.formats.base import FileFormat
from torchkeep.safety.findings import Finding
from torchkeep.safety.limits import DEFAULT_LIMITS, Limits
from torchkeep.safety.pt2 import scan_pt2
from torchkeep.safety.torchfile import scan_torch_stream
from torchkeep.safety.unpickler import Unpickler
from torchkeep.safety.ziparchive import ZipArchive

__all__ = ["ScanResult", "Verdict", "scan"]

Verdict = str  # "SAFE", "UNSAFE", "CORRUPT" or "ERROR"

_TORCH_FAMILY = {FileFormat.TORCH_ZIP, FileFormat.TORCH_LEGACY, FileFormat.PICKLE}


@dataclass(frozen=True)
class ScanResult:
    """The verdict on one file.

    Attributes:
        path: the file.
        format: what it is (``"torch.save (zip)"``, ``"safetensors"``, …).
        verdict: ``"SAFE"``, ``"UNSAFE"``, ``"CORRUPT"`` or ``"ERROR"`` (not
            readable as any model format).
        reason: one line saying why.
        findings: every refused import, call or opcode, with member and offset.
        imports: every ``module.name`` the file's pickles name, allowed or not.
    """

    path: Path
    format: str
    verdict: Verdict
    reason: str
    findings: tuple[Finding, ...] = ()
    imports: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``torchkeep scan --json`` prints)."""
        return {
            "path": str(self.path),
            "format": self.format,
            "verdict": self.verdict,
            "reason": self.reason,
            "findings": [
                {"kind": f.kind, "detail": f.detail, "member": f.member, "offset": f.offset}
                for f in self.findings
            ],
            "imports": list(self.imports),
        }


class _Collected:
    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.imports: list[str] = []
        self.format = "unknown"

    def add(self, unpickler: Unpickler) -> None:
        self.findings += unpickler.findings
        self.imports += unpickler.imports


def scan(path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS) -> ScanResult:
    """Decide whether loading ``path`` could run code, without loading it.

    Reads ``torch.save`` files (zip and legacy), raw pickles (``.pkl``),
    ``.safetensors``, NumPy ``.npy`` / ``.npz`` and ``torch.export`` archives
    (whose nested pickles are scanned too).

    Args:
        path (str | PathLike): the file.
        limits (Limits): the same bounds the loaders enforce.

    Returns:
        A :class:`ScanResult`; this function does not raise for bad files.

    Example:
        >>> torchkeep.scan("downloaded.pt").verdict
        'SAFE'
    """
    p = Path(path)
    collected = _Collected()
    try:
        if not p.is_file():
            return ScanResult(
                p, "unknown", "ERROR", "no such file" if not p.exists() else "not a regular file"
            )
        with p.open("rb") as f:
            _scan_stream(p, f, p.stat().st_size, collected, limits)
    except UnsafeFileError as err:
        return ScanResult(
            p, collected.format, "UNSAFE", _reason(err), _with(collected, err), tuple(collected.imports)
        )
    except LimitExceededError as err:
        return ScanResult(
            p, collected.format, "UNSAFE", _reason(err), tuple(collected.findings), tuple(collected.imports)
        )
    except CorruptFileError as err:
        verdict = "UNSAFE" if collected.findings else "CORRUPT"
        return ScanResult(
            p, collected.format, verdict, _reason(err), tuple(collected.findings), tuple(collected.imports)
        )
    except UnsupportedFormatError as err:
        return ScanResult(
            p, collected.format, "ERROR", _reason(err), tuple(collected.findings), tuple(collected.imports)
        )
    except (TorchkeepError, OSError) as err:
        return ScanResult(
            p, collected.format, "ERROR", first_line(err), tuple(collected.findings), tuple(collected.imports)
        )
    fmt = collected.format
    imports = tuple(dict.fromkeys(collected.imports))
    if collected.findings:
        first = collected.findings[0]
        reason = f"{len(collected.findings)} refused: {first.kind} {first.detail}"
        return ScanResult(p, fmt, "UNSAFE", reason, tuple(collected.findings), imports)
    return ScanResult(p, fmt, "SAFE", "only allowlisted tensors and plain values", (), imports)


def _reason(err: TorchkeepError) -> str:
    text = first_line(err)
    return text.split(" Nothing was unpickled.")[0]


def _with(collected: _Collected, err: UnsafeFileError) -> tuple[Finding, ...]:
    detail = err.reason if not err.globals else ", ".join(err.globals)
    return (*collected.findings, Finding("structure", detail, err.member, err.offset or 0))


def _scan_stream(path: Path, f: Any, size: int, collected: _Collected, limits: Limits) -> None:
    fmt = detection.sniff(path, f, size, limits=limits)
    collected.format = fmt.value
    if fmt in _TORCH_FAMILY:
        scan_torch_stream(path, f, size, limits=limits, collect=collected.add)
    elif fmt is FileFormat.SAFETENSORS:
        st_format.check_safetensors_header(path, f, size, limits=limits)
    elif fmt is FileFormat.NUMPY:
        _scan_npy(path, f, size, None, collected, limits)
    elif fmt is FileFormat.TORCH_EXPORT:
        # vetted as a whole (every member, field, call and expression), as load_model does
        scan_pt2(path, ZipArchive(path, f, size, limits=limits), limits=limits, into=collected.findings)
    else:
        _scan_npz(path, f, size, collected, limits)


def _scan_npz(path: Path, f: Any, size: int, collected: _Collected, limits: Limits) -> None:
    """An .npz (only .npy members, as the sniffer checked): an object array among them is a pickle."""
    archive = ZipArchive(path, f, size, limits=limits)
    for name in archive.members:
        data = archive.read(name, max_size=limits.max_pickle_bytes)
        _scan_npy(path, io.BytesIO(data), len(data), name, collected, limits)


def _scan_npy(
    path: Path, f: Any, size: int, member: str | None, collected: _Collected, limits: Limits
) -> None:
    header = npy_format.read_npy_header(path, f, size, limits=limits, member=member)
    if not header.is_object:
        return
    collected.findings.append(
        Finding(
            "value",
            "an object-dtype array: its data is a pickle that numpy.load(allow_pickle=True) would run",
            member,
            header.data_start,
        )
    )
    if size - header.data_start > limits.max_pickle_bytes:
        raise LimitExceededError(
            path, "max_pickle_bytes", size - header.data_start, limits.max_pickle_bytes, what="the array"
        )
    f.seek(0)
    data = f.read()
    unpickler = Unpickler(
        memoryview(data),
        path=path,
        member=member,
        start=header.data_start,
        storages=None,
        limits=limits,
        collect=True,
    )
    try:
        unpickler.run(allow_trailing=True)
    finally:
        collected.add(unpickler)

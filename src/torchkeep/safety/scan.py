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
import re
import struct
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
from torchkeep.safety.limits import DEFAULT_LIMITS, Limits
from torchkeep.safety.torchfile import LEGACY_PREFIX, scan_torch_stream
from torchkeep.safety.unpickler import Finding, Unpickler
from torchkeep.safety.ziparchive import ZipArchive

__all__ = ["ScanResult", "Verdict", "scan"]

Verdict = str  # "SAFE", "UNSAFE", "CORRUPT" or "ERROR"

_NPY_MAGIC = b"\x93NUMPY"
_MAX_NPY_HEADER = 1 << 16
# numpy writes this exact dict literal (keys sorted); parsed by pattern, never evaluated
_NPY_HEADER = re.compile(
    r"\{'descr': (?P<descr>'[^']{1,64}'|\[.{0,60000}\]), 'fortran_order': (?:True|False), "
    r"'shape': \((?P<shape>[0-9, ]{0,1000})\), \}[ ]*\n?"
)
_DESCR_SIZE = re.compile(r"[<>|=]?([biufcmMSUV])(\d+)")
_NESTED_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".npy")


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
            head = f.read(16)
            _scan_stream(p, f, head, collected, limits)
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


def _scan_stream(path: Path, f: Any, head: bytes, collected: _Collected, limits: Limits) -> None:
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    if head.startswith(b"PK\x03\x04"):
        collected.format = "zip archive"
        _scan_zip(path, f, size, collected, limits)
    elif head.startswith(_NPY_MAGIC):
        collected.format = "numpy .npy"
        f.seek(0)
        _scan_npy(path, f.read(), None, collected, limits)
    elif head.startswith(b"\x80"):
        collected.format = "torch.save (legacy)" if head.startswith(LEGACY_PREFIX) else "pickle"
        scan_torch_stream(path, f, size, limits=limits, collect=collected.add)
    elif len(head) > 8 and head[8:9] == b"{":
        from torchkeep.formats import check_safetensors_header

        collected.format = "safetensors"
        check_safetensors_header(path, f, size, limits=limits)
    else:
        raise UnsupportedFormatError(path, "no model format torchkeep knows", "Nothing to scan.")


def _scan_zip(path: Path, f: Any, size: int, collected: _Collected, limits: Limits) -> None:
    archive = ZipArchive(path, f, size, limits=limits)
    names = list(archive.members)
    if any(n.endswith("/data.pkl") and n.count("/") == 1 for n in names):
        collected.format = "torch.save (zip)"
        scan_torch_stream(path, f, size, limits=limits, collect=collected.add)
        return
    if any(n.endswith(("/archive_format", "models/model.json")) for n in names):
        # vetted as a whole (every member, field, call and expression), as load_model does
        from torchkeep.safety.pt2 import scan_pt2

        collected.format = "torch.export (.pt2)"
        scan_pt2(path, archive, limits=limits, into=collected.findings)
        return
    if names and all(n.endswith(".npy") for n in names):
        collected.format = "numpy .npz"
    for name in names:
        if not name.endswith(_NESTED_SUFFIXES):
            continue
        data = archive.read(name, max_size=limits.max_pickle_bytes)
        if name.endswith(".npy"):
            _scan_npy(path, data, name, collected, limits)
        else:
            _scan_nested(path, name, data, collected, limits)


def _scan_nested(path: Path, name: str, data: bytes, collected: _Collected, limits: Limits) -> None:
    """A pickle or torch.save file stored inside an archive (a .pt2's sample inputs)."""
    inner = _Collected()
    try:
        _scan_stream(path, io.BytesIO(data), data[:16], inner, limits)
    except UnsafeFileError as err:
        raise UnsafeFileError(path, err.globals, reason=f"in {name!r}: {err.reason}", member=name) from err
    except CorruptFileError as err:
        raise CorruptFileError(path, f"in {name!r}: {err.reason}", member=name) from err
    except UnsupportedFormatError:
        return  # not a pickle after all: nothing in it can run
    finally:
        collected.findings += [
            Finding(f.kind, f.detail, f"{name} > {f.member}" if f.member else name, f.offset)
            for f in inner.findings
        ]
        collected.imports += inner.imports


def _scan_npy(path: Path, data: bytes, member: str | None, collected: _Collected, limits: Limits) -> None:
    where = f"member {member!r}" if member else "the array"
    if len(data) < 10 or not data.startswith(_NPY_MAGIC):
        raise CorruptFileError(path, f"{where} is not a .npy array", member=member)
    major = data[6]
    if major == 1:
        (header_len,) = struct.unpack_from("<H", data, 8)
        start = 10
    elif major in {2, 3}:
        (header_len,) = struct.unpack_from("<I", data, 8)
        start = 12
    else:
        raise CorruptFileError(path, f"{where} has an unknown .npy version {major}", member=member)
    if header_len > _MAX_NPY_HEADER or start + header_len > len(data):
        raise CorruptFileError(path, f"{where} has a broken .npy header", member=member)
    text = data[start : start + header_len].decode("latin1")
    header = _NPY_HEADER.fullmatch(text)
    if header is None:
        raise CorruptFileError(path, f"{where} has a malformed .npy header", member=member)
    descr = header.group("descr")
    shape_text = header.group("shape").replace(" ", "").rstrip(",")
    shape = tuple(int(d) for d in shape_text.split(",")) if shape_text else ()
    body = start + header_len
    if "'O" in descr or "|O" in descr:
        collected.findings.append(
            Finding(
                "value",
                "an object-dtype array: its data is a pickle that numpy.load(allow_pickle=True) would run",
                member,
                body,
            )
        )
        unpickler = Unpickler(
            memoryview(data), path=path, member=member, start=body, storages=None, limits=limits, collect=True
        )
        try:
            unpickler.run(allow_trailing=True)
        finally:
            collected.add(unpickler)
        return
    match = _DESCR_SIZE.fullmatch(descr.strip("'"))
    if match:
        itemsize = int(match.group(2)) * (4 if match.group(1) == "U" else 1)
        numel = 1
        for d in shape:
            numel *= d
        if numel > limits.max_numel:
            raise LimitExceededError(path, "max_numel", numel, limits.max_numel, what=where)
        if numel * itemsize != len(data) - body:
            raise CorruptFileError(
                path, f"{where} should hold {numel * itemsize} bytes of data, it holds {len(data) - body}"
            )

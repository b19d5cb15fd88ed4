"""``torchkeep scan PATH...``: would loading these files run code? Decided by the loader's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from torchkeep.cli._limits import RAISE_LIMIT_HELP, parse_limits
from torchkeep.errors import TorchkeepError, UnknownFormatError
from torchkeep.formats.detect import sniff
from torchkeep.safety import ScanResult, scan

__all__ = ["scan_command", "scan_exit_code"]

_STYLE = {"SAFE": "green", "UNSAFE": "bold red", "CORRUPT": "yellow", "ERROR": "yellow"}
_SHOWN_FINDINGS = 20


def scan_exit_code(results: list[ScanResult]) -> int:
    """0 all safe, 1 anything unsafe, 2 otherwise (damaged or unreadable files)."""
    verdicts = {r.verdict for r in results}
    if "UNSAFE" in verdicts:
        return 1
    return 0 if verdicts <= {"SAFE"} else 2


# scanned in a folder whatever they hold: a file named like a model file that is none is an ERROR
_MODEL_SUFFIXES = {
    ".pt",
    ".pth",
    ".bin",
    ".ckpt",
    ".pkl",
    ".pickle",
    ".safetensors",
    ".npy",
    ".npz",
    ".pt2",
    ".tar",
}


def _skip_reason(path: Path) -> str | None:
    """Why a file found in a folder is not scanned (no model format, by the one sniffer), or None."""
    if path.suffix.lower() in _MODEL_SUFFIXES:
        return None
    try:
        size = path.stat().st_size
        if size == 0:
            return "an empty file"
        with path.open("rb") as f:
            sniff(path, f, size)
    except UnknownFormatError as err:
        return f"not a model file ({err.detected})"
    except (TorchkeepError, OSError):  # a damaged or unreadable model file: scan says which
        return None
    return None  # a model format under another name (a pickle called config.json): scanned


def _expand(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files to scan, and files of folders skipped as no model files (with why)."""
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        if not path.is_dir():
            found.append(path)  # named on the command line: always scanned
            continue
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            reason = _skip_reason(file)
            if reason is None:
                found.append(file)
            else:
                skipped.append((file, reason))
    return found, skipped


def scan_command(
    paths: list[Path] = typer.Argument(..., help="Files or folders (scanned recursively)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per file, as a list."),
    raise_limit: list[str] | None = typer.Option(None, "--raise-limit", help=RAISE_LIMIT_HELP),
) -> None:
    """Say for each file whether loading it could run code: SAFE, UNSAFE (with every import and
    call it would make, and where), CORRUPT or ERROR. Reads .pt/.pth/.bin/.ckpt/.pkl (zip or raw
    pickle), .safetensors, .npy/.npz and .pt2. Nothing is unpickled.

    In a folder, files of no model format (config.json, README.md, tokenizer files) are listed as
    SKIPPED; files with a model suffix and files whose bytes are a model format under another
    name are scanned.

    Exit code: 0 all safe, 1 something unsafe, 2 a file is damaged or unreadable (or no model
    file was found).
    """
    limits = parse_limits(raise_limit)
    files, skipped = _expand(paths)
    results = [scan(path, limits=limits) for path in files]
    code = scan_exit_code(results) if results else 2
    if as_json:
        rows = [r.to_dict() for r in results] + [
            {
                "path": str(p),
                "format": "unknown",
                "verdict": "SKIPPED",
                "reason": why,
                "findings": [],
                "imports": [],
            }
            for p, why in skipped
        ]
        typer.echo(json.dumps(rows, indent=2))
        raise typer.Exit(code)
    console = Console(highlight=False, soft_wrap=True)
    for result in results:
        style = _STYLE[result.verdict]
        console.print(
            f"[{style}]{result.verdict:<7}[/] {escape(str(result.path))}  [dim]{escape(result.format)}[/]"
        )
        if result.verdict != "SAFE":
            console.print(f"        {escape(result.reason)}")
        for finding in result.findings[:_SHOWN_FINDINGS]:
            where = f"{finding.member} @ {finding.offset}" if finding.member else f"offset {finding.offset}"
            console.print(f"        - {finding.kind:<9} {escape(finding.detail)}  [dim]({escape(where)})[/]")
        if len(result.findings) > _SHOWN_FINDINGS:
            console.print(f"        … {len(result.findings) - _SHOWN_FINDINGS} more (see --json)")
    for path, why in skipped:
        console.print(f"[dim]SKIPPED {escape(str(path))}  {escape(why)}[/]")
    if not results:
        console.print("no model files found: nothing was scanned")
    raise typer.Exit(code)

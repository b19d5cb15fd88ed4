"""``torchkeep scan PATH...``: would loading these files run code? Decided by the loader's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from torchkeep.cli._limits import RAISE_LIMIT_HELP, parse_limits
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


def _expand(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file())
        else:
            found.append(path)
    return found


def scan_command(
    paths: list[Path] = typer.Argument(..., help="Files or folders (scanned recursively)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per file, as a list."),
    raise_limit: list[str] | None = typer.Option(None, "--raise-limit", help=RAISE_LIMIT_HELP),
) -> None:
    """Say for each file whether loading it could run code: SAFE, UNSAFE (with every import and
    call it would make, and where), CORRUPT or ERROR. Reads .pt/.pth/.bin/.ckpt/.pkl (zip or raw
    pickle), .safetensors, .npy/.npz and .pt2. Nothing is unpickled.

    Exit code: 0 all safe, 1 something unsafe, 2 a file is damaged or unreadable.
    """
    limits = parse_limits(raise_limit)
    results = [scan(path, limits=limits) for path in _expand(paths)]
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
        raise typer.Exit(scan_exit_code(results))
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
    raise typer.Exit(scan_exit_code(results))

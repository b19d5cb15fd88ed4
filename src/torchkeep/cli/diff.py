"""``torchkeep diff A B``: which tensors differ between two weight files."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from torchkeep.diff import diff

__all__ = ["diff_command"]


def diff_command(
    a: Path = typer.Argument(..., help="First weights or checkpoint file."),
    b: Path = typer.Argument(..., help="Second weights or checkpoint file."),
    atol: float = typer.Option(0.0, "--atol", help="Differences up to this count as equal."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Show tensors that changed, are only in A, or only in B (exit 0 identical, 1 different)."""
    result = diff(a, b, atol=atol)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        Console(highlight=False).print(str(result), markup=False)
    if not result.identical:
        raise typer.Exit(1)

"""``torchkeep diff A B``: which tensors differ between two weight files."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from torchkeep.diff import diff

__all__ = ["diff_command"]


def diff_command(
    a: Path = typer.Argument(..., help="First weights or checkpoint file."),
    b: Path = typer.Argument(..., help="Second weights or checkpoint file."),
    atol: float = typer.Option(0.0, "--atol", help="Differences up to this count as equal."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Show tensors that changed, are only in A, or only in B (exit 0 identical, 1 different).

    A name one file stores once for two tied tensors (GPT-2's lm_head.weight, saved by
    transformers as transformer.wte.weight) is listed as tied, compared through its twin.
    """
    result = diff(a, b, atol=atol)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:  # plain text, never wrapped: names stay whole in a pipe and on a narrow terminal
        typer.echo(str(result))
    if not result.identical:
        raise typer.Exit(1)

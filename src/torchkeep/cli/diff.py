"""``torchkeep diff A B``: which tensors differ between two weight files."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from torchkeep.diff import diff
from torchkeep.plots import SCALES, picture_format, plot_changes
from torchkeep.weights import load_weights

__all__ = ["diff_command"]


def diff_command(
    a: Path = typer.Argument(..., help="First weights or checkpoint file."),
    b: Path = typer.Argument(..., help="Second weights or checkpoint file."),
    atol: float = typer.Option(0.0, "--atol", help="Differences up to this count as equal."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="Also draw the relative change ||B-A||/||A|| per tensor, frozen ones grey (changes.png, .svg).",
    ),
    scale: str = typer.Option("auto", "--scale", help=f"The picture's axis: {', '.join(SCALES)}."),
) -> None:
    """Show tensors that changed, are only in A, or only in B (exit 0 identical, 1 different).

    A name one file stores once for two tied tensors (GPT-2's lm_head.weight, saved by
    transformers as transformer.wte.weight) is listed as tied, compared through its twin.
    """
    if plot is None:
        result = diff(a, b, atol=atol)
    else:
        if scale not in SCALES:
            raise typer.BadParameter(f"{scale!r} is not one of {', '.join(SCALES)}", param_hint="--scale")
        picture_format(plot)  # matplotlib there, a picture suffix: checked before the files are read
        sa, sb = load_weights(a), load_weights(b)  # read once, for the comparison and the picture
        result = diff(sa, sb, atol=atol)
        typer.echo(f"picture: {plot_changes(sa, sb, plot, scale=scale, names=(str(a), str(b)))}", err=True)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:  # plain text, never wrapped: names stay whole in a pipe and on a narrow terminal
        typer.echo(str(result))
    if not result.identical:
        raise typer.Exit(1)

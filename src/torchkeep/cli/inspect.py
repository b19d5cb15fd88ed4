"""``torchkeep inspect PATH``: what a model file holds."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from torchkeep._table import format_bytes
from torchkeep.summary import Summary, summarize

__all__ = ["inspect_command", "summary_table"]


def summary_table(summary: Summary, *, limit: int | None = None) -> Table:
    """A rich table of a summary's rows (the first ``limit`` of them)."""
    table = Table(show_edge=False, header_style="bold")
    for name, justify in (
        ("name", "left"),
        ("kind", "left"),
        ("shape", "left"),
        ("dtype", "left"),
        ("numel", "right"),
        ("size", "right"),
        ("note", "left"),
    ):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    rows = summary.rows if limit is None else summary.rows[:limit]
    for r in rows:
        notes = ["[cyan]frozen[/]" if note == "frozen" else note for note in r.notes()]
        table.add_row(
            r.name,
            r.kind,
            str(list(r.shape)),
            r.dtype,
            f"{r.numel:,}",
            format_bytes(r.nbytes),
            ", ".join(notes),
        )
    if limit is not None and len(summary.rows) > limit:
        table.add_row(f"… {len(summary.rows) - limit} more", "", "", "", "", "", "")
    return table


def inspect_command(
    path: Path = typer.Argument(..., help="A weights, checkpoint or model file."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    limit: int = typer.Option(200, "--limit", help="Show at most this many tensors (the totals count all)."),
) -> None:
    """Show the tensors in a file: names, shapes, dtypes, sizes, format and metadata."""
    summary = summarize(path)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    console = Console()
    console.print(f"[bold]{path}[/]  {summary.file_format}, {format_bytes(summary.file_size or 0)}")
    for key, value in summary.metadata.items():
        console.print(f"  {key}: {value}", highlight=False)
    console.print(summary_table(summary, limit=limit))
    console.print(summary.totals_line())

"""``torchkeep inspect PATH``: what a model file holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from torchkeep._table import format_bytes, is_terminal, print_table, rich_table
from torchkeep.stats import STATS_HEADERS, STATS_RIGHT, StatsReport, TensorStats, iter_stats, stats_cells
from torchkeep.summary import Summary, summarize

__all__ = ["inspect_command", "summary_table"]


_HEADERS = ("name", "kind", "shape", "dtype", "numel", "size", "note")
_RIGHT = (4, 5)


def _rows(summary: Summary, limit: int | None) -> list[list[str | Text]]:
    rows: list[list[str | Text]] = []
    for r in summary.rows if limit is None else summary.rows[:limit]:
        notes = Text(", ").join(Text(n, style="cyan" if n == "frozen" else "") for n in r.notes())
        rows.append(
            [r.name, r.kind, str(list(r.shape)), r.dtype, f"{r.numel:,}", format_bytes(r.nbytes), notes]
        )
    return rows


def _more(summary: Summary, limit: int | None) -> str | None:
    if limit is None or len(summary.rows) <= limit:
        return None
    return f"… {len(summary.rows) - limit} more (pass --limit {len(summary.rows)} to see all)"


def summary_table(summary: Summary, *, limit: int | None = None) -> Table:
    """A rich table of a summary's rows (the first ``limit`` of them); names are never wrapped."""
    table = rich_table(_HEADERS, _rows(summary, limit), right=_RIGHT)
    more = _more(summary, limit)
    if more is not None:
        table.add_row(more, "", "", "", "", "", "")
    return table


def inspect_command(
    path: Path = typer.Argument(..., help="A weights, checkpoint or model file."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    limit: int = typer.Option(200, "--limit", help="Show at most this many tensors (the totals count all)."),
    stats: bool = typer.Option(
        False, "--stats", help="Read the values: min / max / mean / std and NaN / Inf counts per tensor."
    ),
) -> None:
    """Show the tensors in a file: names, shapes, dtypes, sizes, format and metadata.

    With --stats, read every value once, a chunk at a time (memory stays small whatever the
    file's size), and show each tensor's min / max / mean / std over its finite values and
    its NaN / Inf counts.

    Piped or redirected, the table is plain text, one tensor per line with every name whole
    (``torchkeep inspect m.pt | grep running_mean``).
    """
    if stats:
        _print_stats(path, as_json=as_json, limit=limit)
        return
    summary = summarize(path)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    typer.echo(f"{path}  {summary.file_format}, {format_bytes(summary.file_size or 0)}")
    for key, value in summary.metadata.items():
        typer.echo(f"  {key}: {value}")
    print_table(_HEADERS, _rows(summary, limit), right=_RIGHT)
    more = _more(summary, limit)
    if more is not None:
        typer.echo(more)
    typer.echo(summary.totals_line())


def _read_stats(path: Path) -> StatsReport:
    """The stats of ``path``; on a terminal, with a spinner naming the tensors read so far (on stderr)."""
    fmt, rows = iter_stats(path)
    if not is_terminal(sys.stderr):
        return StatsReport(tuple(rows), str(path), fmt)
    done: list[TensorStats] = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"reading {path}", total=None)
        for row in rows:
            done.append(row)
            progress.update(task, description=f"reading {path}: {len(done)} tensors, last {row.name}")
    return StatsReport(tuple(done), str(path), fmt)


def _print_stats(path: Path, *, as_json: bool, limit: int) -> None:
    report = _read_stats(path)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    typer.echo(f"{path}  {report.file_format}")
    rows: list[list[str | Text]] = []
    for row in report.rows[:limit]:
        cells: list[str | Text] = list(stats_cells(row))
        if not row.finite:  # red on a terminal; plain text (same cells) in a pipe
            cells[7:9] = [Text(str(c), style="bold red") for c in cells[7:9]]
        rows.append(cells)
    print_table(STATS_HEADERS, rows, right=STATS_RIGHT)
    if len(report.rows) > limit:
        typer.echo(f"… {len(report.rows) - limit} more (pass --limit {len(report.rows)} to see all)")
    typer.echo(report.totals_line())

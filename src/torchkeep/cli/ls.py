"""``torchkeep ls RUN_DIR``: the checkpoints of a run."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from torchkeep._table import format_bytes, print_table
from torchkeep.plots import plot_metrics
from torchkeep.run.reader import RunReader, rank
from torchkeep.storage.remote import is_url

__all__ = ["ls_command"]


def ls_command(
    run_dir: str = typer.Argument(
        ..., help="A run folder written by torchkeep.Checkpointer, or its URL (s3://bucket/run)."
    ),
    monitor: str | None = typer.Option(None, "--monitor", help="Metric that marks the best checkpoint."),
    mode: str = typer.Option("min", "--mode", help="min or max: which way the metric is better."),
    verify: bool = typer.Option(False, "--verify", help="Check the checksums too (reads every file)."),
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="Also draw every metric over steps, best and kept marked (metrics.png, .svg, .pdf).",
    ),
) -> None:
    """List the checkpoints of a run: step, time, size, metrics, valid or not, best and latest.

    "size" is the whole checkpoint; "new" what its save added to the run (checkpoints share the
    tensors that did not change between saves, e.g. a frozen backbone, written once).
    """
    if not is_url(run_dir) and not Path(run_dir).is_dir():
        raise FileNotFoundError(
            f"{run_dir}: no such run folder; pass the folder given to torchkeep.Checkpointer"
        )
    entries = RunReader(run_dir).entries(verify=verify)  # reads only: safe while a writer saves
    if monitor is None:  # default to the metric the checkpoints share, if there is exactly one
        names = {name for e in entries for name in e.metrics}
        monitor = names.pop() if len(names) == 1 else None
    ranked = rank(entries, monitor, mode)
    if plot is not None:  # the one file written, where the user said; on stderr, so --json stays JSON
        typer.echo(
            f"picture: {plot_metrics(entries, plot, monitor=monitor, mode=mode, name=run_dir)}", err=True
        )
    best = ranked[0].path if ranked else None
    latest = next((e.path for e in reversed(entries) if e.valid), None)
    if as_json:
        rows = [
            {
                "path": str(e.path),
                "step": e.step,
                "epoch": e.epoch,
                "created": e.created,
                "size": e.size,
                "new": e.new,
                "metrics": e.metrics,
                "valid": e.valid,
                "reason": e.reason,
                "nonfinite": e.nonfinite,
                "best": e.path == best,
                "latest": e.path == latest,
            }
            for e in entries
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    console = Console(highlight=False)
    if not entries:
        console.print(f"{run_dir}: no checkpoints yet")
        return
    table: list[list[str | Text]] = []
    for e in entries:
        marks = [m for m, path in (("best", best), ("latest", latest)) if e.path == path]
        status = Text("valid", style="green") if e.valid else Text(f"invalid: {e.reason}", style="red")
        if e.poisoned:
            status.append(f" (poisoned: NaN/Inf in {_nonfinite_text(e.nonfinite)})", style="yellow")
        if marks:
            status.append(" (" + ", ".join(marks) + ")", style="bold")
        metrics = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in e.metrics.items()
        )
        created = e.created or ""
        epoch = "" if e.epoch is None else str(e.epoch)
        table.append(
            [e.name, str(e.step), epoch, created, format_bytes(e.size), format_bytes(e.new), metrics, status]
        )
    # plain, parseable lines in a pipe; a rich table on a terminal; names never cut either way
    columns = ("checkpoint", "step", "epoch", "created", "size", "new", "metrics", "status")
    print_table(columns, table, right=(1, 4, 5), whole=(0,))


def _nonfinite_text(found: dict[str, list[str]]) -> str:
    return "; ".join(
        f"{kind} {', '.join(names[:3])}" + (" …" if len(names) > 3 else "") for kind, names in found.items()
    )

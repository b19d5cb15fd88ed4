"""``torchkeep export-step CHECKPOINT OUT``: one checkpoint of a run as a standalone folder."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from torchkeep._table import format_bytes
from torchkeep.run.export import export_step
from torchkeep.storage.base import open_store

__all__ = ["export_step_command"]


def export_step_command(
    checkpoint: str = typer.Argument(
        ...,
        help="A checkpoint folder of a run (runs/exp1/step-00000120), or a run folder (its newest "
        "valid checkpoint); a URL works too.",
    ),
    out: str = typer.Argument(
        ..., help="The folder to write; name it step-<N> inside a run folder to restore it from there."
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Copy one checkpoint out of its run with every tensor it uses, as a standalone folder.

    Checkpoints of a run share the tensors that did not change between saves, so a step folder
    alone is not the whole checkpoint: copy this command's output instead. The checkpoint is
    verified (every file and every tensor checked) before anything is written.
    """
    written = export_step(checkpoint, out, overwrite=force)
    sizes = open_store(written).sizes("") or {}
    Console(highlight=False, soft_wrap=True).print(
        f"exported {escape(str(checkpoint))} -> {escape(str(written))} "
        f"({len(sizes)} files, {format_bytes(sum(sizes.values()))})"
    )

"""``torchkeep verify PATH``: is a checkpoint (or a run, or a file) whole?"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from torchkeep.errors import TorchkeepError
from torchkeep.formats import FileFormat, detect_format, require_file
from torchkeep.run.layout import MANIFEST, is_step, nonfinite_of
from torchkeep.run.reader import CheckpointEntry, RunReader, verify_step
from torchkeep.storage.remote import is_url
from torchkeep.weights import load_weights, read_torch_file

__all__ = ["verify_command", "verify_path"]


def verify_path(path: Path) -> list[tuple[str, bool, str]]:
    """``(name, ok, reason)`` for a checkpoint folder, each checkpoint of a run folder, or a file
    (a valid checkpoint's reason notes NaN/Inf found at save)."""
    if path.is_dir():
        if (path / MANIFEST).exists() or is_step(path.name):
            verdict = verify_step(path)
            return [
                (path.name, verdict.ok, verdict.reason or _poisoned(nonfinite_of(verdict.manifest or {})))
            ]
        entries = RunReader(path).entries(verify=True)
        if not entries:
            return [(path.name, False, "no checkpoints in this folder")]
        return [_row(e) for e in entries]
    try:
        require_file(path)
        fmt = detect_format(path)
        if fmt is FileFormat.SAFETENSORS or fmt is FileFormat.TORCH_EXPORT:
            load_weights(path)
        else:
            read_torch_file(path, map_location="cpu")  # every record read, nothing unpickled unsafely
    except TorchkeepError as err:
        return [(path.name, False, str(err))]
    return [(path.name, True, "")]


def _poisoned(found: dict[str, list[str]]) -> str:
    """The note for a whole checkpoint that held NaN/Inf at save (empty when clean)."""
    if not found:
        return ""
    return "poisoned: NaN/Inf in " + "; ".join(
        f"{kind} {', '.join(names[:3])}" for kind, names in found.items()
    )


def _row(entry: CheckpointEntry) -> tuple[str, bool, str]:
    return entry.name, entry.valid, entry.reason or _poisoned(entry.nonfinite)


def verify_command(
    path: str = typer.Argument(
        ..., help="A checkpoint folder, a run folder (or its URL, s3://bucket/run), or a single file."
    ),
) -> None:
    """Check that checkpoints are whole: manifest sizes and checksums, or a full read of a file.

    Exits 0 when everything is valid and 1 when anything is not.
    """
    if is_url(path):
        results = [_row(e) for e in RunReader(path).entries(verify=True)]
        if not results:
            results = [(path, False, "no checkpoints at this URL")]
    elif not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    else:
        results = verify_path(Path(path))
    console = Console(highlight=False, soft_wrap=True)
    for name, ok, reason in results:
        if ok:
            console.print(f"[green]valid[/]    {name}" + (f" [yellow]({reason})[/]" if reason else ""))
        else:
            console.print(f"[red]invalid[/]  {name}: {reason}")
    if not all(ok for _, ok, _ in results):
        raise typer.Exit(1)

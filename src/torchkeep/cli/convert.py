"""``torchkeep convert IN OUT``: weights between ``.pt`` and ``.safetensors``, or out of a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.console import Console

from torchkeep._table import format_bytes
from torchkeep.cli._limits import RAISE_LIMIT_HELP, parse_limits
from torchkeep.consolidate import consolidate
from torchkeep.weights import load_weights, read_metadata, save_weights

__all__ = ["convert_command"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def convert_command(
    source: Path = typer.Argument(
        ...,
        help="The file to read (any weights or checkpoint file), or a checkpoint folder "
        "(Checkpointer, sharded or not, or any torch.distributed.checkpoint folder).",
    ),
    target: Path = typer.Argument(..., help="The file to write; its suffix picks the format."),
    key: str | None = typer.Option(None, "--key", help="Entry of a checkpoint dict that holds the weights."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Cast floating-point tensors: float32, float16, bfloat16."
    ),
    trust: bool = typer.Option(
        False,
        "--trust",
        help="Allow unpickling any object, e.g. a whole pickled model (runs code from the file).",
    ),
    raise_limit: list[str] | None = typer.Option(None, "--raise-limit", help=RAISE_LIMIT_HELP),
) -> None:
    """Convert weights between .pt/.pth/.bin and .safetensors (by suffix), or consolidate a checkpoint."""
    if dtype is not None and dtype not in _DTYPES:
        raise typer.BadParameter(f"choose one of {', '.join(_DTYPES)}", param_hint="--dtype")
    if source.is_dir():
        written = Path(consolidate(source, target, dtype=_DTYPES[dtype] if dtype else None))
        Console().print(
            f"consolidated the model of {source} into [bold]{written}[/] "
            f"({format_bytes(written.stat().st_size)})",
            highlight=False,
        )
        return
    state = load_weights(source, key=key, trust=trust, limits=parse_limits(raise_limit))
    metadata = read_metadata(source)
    metadata.pop("format", None)
    save_weights(state, target, dtype=_DTYPES[dtype] if dtype else None, metadata=metadata)
    Console().print(
        f"wrote {len(state)} tensors to [bold]{target}[/] ({format_bytes(target.stat().st_size)})",
        highlight=False,
    )

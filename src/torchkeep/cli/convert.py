"""``torchkeep convert IN OUT``: weights between ``.pt`` and ``.safetensors``, or out of a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.markup import escape

from torchkeep._table import format_bytes
from torchkeep.cli._limits import RAISE_LIMIT_HELP, parse_limits
from torchkeep.consolidate import consolidate
from torchkeep.formats.hf import find_hf_weights, is_index_name
from torchkeep.weights import load_weights, read_metadata, save_weights

__all__ = ["convert_command"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def convert_command(
    source: Path = typer.Argument(
        ...,
        help="The file to read (any weights or checkpoint file), or a checkpoint folder "
        "(Checkpointer, sharded or not, or any torch.distributed.checkpoint folder).",
    ),
    target: Path = typer.Argument(
        ...,
        help="The file to write (its suffix picks the format), or a folder for Hugging Face shards "
        "(FOLDER/pytorch_model.bin.index.json for .bin shards).",
    ),
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
    max_shard_size: str | None = typer.Option(
        None,
        "--max-shard-size",
        help="Write Hugging Face shards of at most this size (5GB, 500MB, 50KB, 2GiB) into TARGET; "
        "the default for a TARGET folder is 5GB.",
    ),
) -> None:
    """Convert weights between .pt/.pth/.bin and .safetensors (by suffix), between one file and
    Hugging Face shards (a folder or an index, either way), or consolidate a checkpoint."""
    if dtype is not None and dtype not in _DTYPES:
        raise typer.BadParameter(f"choose one of {', '.join(_DTYPES)}", param_hint="--dtype")
    hf = find_hf_weights(source)  # a Hugging Face folder or shard index is read as weights
    if source.is_dir() and hf is None:
        written = Path(consolidate(source, target, dtype=_DTYPES[dtype] if dtype else None))
        Console().print(
            f"consolidated the model of {escape(str(source))} into [bold]{escape(str(written))}[/] "
            f"({format_bytes(written.stat().st_size)})",
            highlight=False,
        )
        return
    state = load_weights(source, key=key, trust=trust, limits=parse_limits(raise_limit))
    metadata = read_metadata(hf.files[0] if hf is not None else source)
    metadata.pop("format", None)
    if max_shard_size is None and (target.is_dir() or not target.suffix or is_index_name(target)):
        max_shard_size = "5GB"
    save_weights(
        state,
        target,
        dtype=_DTYPES[dtype] if dtype else None,
        metadata=metadata,
        max_shard_size=max_shard_size,
    )
    size = sum(f.stat().st_size for f in _written(target, sharded=max_shard_size is not None))
    Console().print(
        f"wrote {len(state)} tensors to [bold]{escape(str(target))}[/] ({format_bytes(size)})",
        highlight=False,
    )


def _written(target: Path, *, sharded: bool) -> list[Path]:
    written = find_hf_weights(target.parent if is_index_name(target) else target) if sharded else None
    if written is None:
        return [target]
    return [*written.files, *([written.index.path] if written.index is not None else [])]

"""``torchkeep average OUT SRC...``: the (weighted) average of several weights files, written to OUT."""

from __future__ import annotations

import os

import typer
from rich.console import Console
from rich.markup import escape

from torchkeep._table import format_bytes
from torchkeep.averaging import average, check_out, normalized_weights
from torchkeep.errors import InvalidArgumentError
from torchkeep.storage.remote import is_url

__all__ = ["average_command", "parse_weights"]


def parse_weights(text: str | None) -> list[float] | None:
    """``"0.5,0.3,0.2"`` -> ``[0.5, 0.3, 0.2]`` (None stays None).

    Raises:
        typer.BadParameter: an entry is not a number.
    """
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a comma-separated list of numbers (e.g. 0.5,0.3,0.2)", param_hint="--weights"
        ) from None


def average_command(
    out: str = typer.Argument(
        ..., help="The file to write; its suffix picks the format (.safetensors, .pt, .pth, .bin)."
    ),
    sources: list[str] = typer.Argument(
        ...,
        help="The weights to average: weights or checkpoint files, step folders, run folders (their "
        "newest valid checkpoint), Hugging Face folders, URLs. All must hold the same keys, shapes "
        "and dtypes.",
    ),
    weights: str | None = typer.Option(
        None,
        "--weights",
        help="One weight per source, comma-separated (0.5,0.3,0.2); normalised to sum to 1. "
        "Default: uniform.",
    ),
    float32: bool = typer.Option(
        False, "--float32", help="Sum in float32 instead of float64 (half the memory for a big model)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace OUT if it exists (it may never be one of the sources)."
    ),
) -> None:
    """Average the weights of several files into OUT (a model soup, or SWA over checkpoints).

    Floating-point tensors are averaged; integer ones (BatchNorm's num_batches_tracked) come from
    the source with the largest weight. Sources are read one at a time. BatchNorm statistics are
    averaged like any tensor: recompute them (torch.optim.swa_utils.update_bn) for best results.
    OUT comes first; an existing OUT is refused unless --force.
    """
    import torch

    values = parse_weights(weights)
    shares = normalized_weights(values, len(sources), option="--weights")
    check_out(out, sources)  # first: --force never replaces a source
    if not force and not is_url(out) and os.path.lexists(out):
        example = " ".join(["soup.safetensors", out, *sources[:2]]) + (" ..." if len(sources) > 2 else "")
        raise InvalidArgumentError(
            "OUT",
            out,
            "already exists (OUT, the first path, is the file to write)",
            f"pass --force to replace it; if it was meant as a source, name the file to write first, "
            f"e.g. torchkeep average {example}",
        )
    result = average(
        sources, out, weights=values, accumulate_dtype=torch.float32 if float32 else torch.float64
    )
    shown = ", ".join(f"{s:.4g}" for s in shares)
    size = f" ({format_bytes(os.path.getsize(out))})" if os.path.isfile(out) else ""
    Console(soft_wrap=True).print(  # names are never cut or wrapped
        f"averaged {len(sources)} sources (weights {shown}) into [bold]{escape(out)}[/]: "
        f"{len(result)} tensors{size}",
        highlight=False,
    )

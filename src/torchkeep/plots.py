"""Pictures of a run: metrics over steps, and how far each tensor moved between two sets of weights.

Drawn with matplotlib's Agg backend (no display needed) and written
atomically: a picture is whole or absent. matplotlib is optional
(``pip install 'torchkeep[plot]'``); without it the functions raise
:class:`~torchkeep.errors.MissingExtraError` saying so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torchkeep.errors import MissingExtraError, UnsupportedSuffixError
from torchkeep.run.reader import CheckpointEntry, RunReader, metric_value, rank
from torchkeep.stats import Source, TensorChange, relative_changes
from torchkeep.storage.atomic import atomic_target

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["SCALES", "draw_changes", "draw_metrics", "picture_format", "plot_changes", "plot_metrics"]

SCALES = ("auto", "linear", "log")

_BEST = "#e6a100"  # gold
_POISONED = "#d62728"  # red
_DAMAGED = "#7f7f7f"  # grey
_LINE = "#1f77b4"  # blue


def _canvas() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError as err:
        raise MissingExtraError("matplotlib", "plot") from err
    return FigureCanvasAgg


def _figure(width: float, height: float, *, layout: Literal["constrained"] | None = None) -> Figure:
    """A new figure on the Agg canvas: no display, no global pyplot state."""
    canvas = _canvas()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    canvas(fig)
    return fig


def picture_format(out: str | os.PathLike[str]) -> str:
    """The picture format ``out``'s suffix names (``"png"``, ``"svg"``, ``"pdf"``, …), checked up front.

    Raises:
        MissingExtraError: matplotlib is not installed (``pip install 'torchkeep[plot]'``).
        UnsupportedSuffixError: the suffix is not a format matplotlib writes.
    """
    target = Path(out)
    supported = _canvas().get_supported_filetypes()
    kind = target.suffix.lower().lstrip(".")
    if kind not in supported:
        first = ("png", "svg", "pdf")
        order = [*first, *sorted(k for k in supported if k not in first)]
        raise UnsupportedSuffixError(target, [f".{k}" for k in order if k in supported], what="a picture")
    return kind


def _save(fig: Figure, out: str | os.PathLike[str]) -> Path:
    target = Path(out)
    kind = picture_format(target)
    with atomic_target(target, durable=False) as tmp:  # a picture is whole or absent
        fig.savefig(tmp, format=kind, bbox_inches="tight")
    return target


# --- metrics over steps ----------------------------------------------------------------------------


def _metric_names(entries: Sequence[CheckpointEntry]) -> list[str]:
    names: dict[str, None] = {}
    for e in entries:
        for name in e.metrics:
            names.setdefault(name, None)
    return list(names)


def draw_metrics(
    entries: Sequence[CheckpointEntry],
    *,
    monitor: str | None = None,
    mode: str = "min",
    name: str | None = None,
) -> Figure:
    """A figure of every metric over the steps of a run's checkpoints.

    One panel per metric, sharing the step axis. Every checkpoint in the run
    (those its retention kept) is a dot on the line; the best one by
    ``monitor`` is a gold star with a dashed line through all panels; the
    latest is ringed; a checkpoint whose tensors or metrics held NaN/Inf at
    save is a red line through all panels (a red cross at the panel's top
    where the metric itself was NaN/Inf); a damaged one a grey dotted line.

    Args:
        entries (Sequence[CheckpointEntry]): the checkpoints, e.g. ``RunReader(run).entries()``.
        monitor (str | None, default None): the metric that ranks checkpoints;
            None marks no best.
        mode (str, default "min"): ``"min"`` or ``"max"``: which way ``monitor`` is better.
        name (str | None, default None): the run's name, to open the title with.

    Returns:
        A matplotlib ``Figure`` (Agg canvas), e.g. to save with ``fig.savefig``.

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    names = _metric_names(entries)
    panels = max(1, len(names))
    fig = _figure(9.0, 1.9 * panels + 1.4, layout="constrained")  # title, legend, panels: no overlaps
    axes: list[Axes] = list(fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0])
    ranked = rank(entries, monitor, mode)
    best = ranked[0] if ranked else None
    latest = next((e for e in reversed(entries) if e.valid), None)
    panel_names: list[str | None] = list(names) or [None]
    for ax, metric in zip(axes, panel_names, strict=True):
        label = f"best by {monitor} ({mode}): {best.name}" if best is not None else ""
        _metric_panel(ax, entries, metric, best, latest, label)
    for e in entries:  # markers that concern the whole checkpoint, through every panel
        for ax in axes:
            if e.poisoned:
                ax.axvline(e.step, color=_POISONED, lw=2, alpha=0.55, label="NaN/Inf at save (poisoned)")
            elif not e.valid:
                ax.axvline(e.step, color=_DAMAGED, lw=1.5, ls=":", label="damaged (fails verification)")
    if best is not None:
        for ax in axes:
            ax.axvline(best.step, color=_BEST, lw=1.2, ls="--", zorder=1)
    axes[-1].set_xlabel("step")
    from matplotlib.ticker import MaxNLocator

    if not entries:
        axes[-1].set_xticks([])
    elif len(entries) <= 12:  # few checkpoints: a tick at each one's step
        axes[-1].set_xticks([e.step for e in entries])
    else:
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    for ax in axes:
        ax.grid(True, alpha=0.3)
    steps = [e.step for e in entries]
    span = f", steps {min(steps)} to {max(steps)}" if steps else ""
    title = f"{name + ': ' if name else ''}{len(entries)} checkpoint{'s' if len(entries) != 1 else ''}{span}"
    note = ""
    if monitor is not None and best is None and entries:
        note = f"\n(no valid, finite checkpoint carries {monitor!r}: no best marked)"
    elif monitor is None and len(names) > 1:
        note = "\n(pass monitor / --monitor to mark the best checkpoint)"
    _figure_legend(fig, axes, title + note)
    return fig


def _metric_panel(
    ax: Axes,
    entries: Sequence[CheckpointEntry],
    name: str | None,
    best: CheckpointEntry | None,
    latest: CheckpointEntry | None,
    best_label: str = "best",
) -> None:
    if name is None:  # no metrics saved: still show which checkpoints the run holds
        if entries:
            steps = [e.step for e in entries]
            ax.plot(steps, [0] * len(steps), "o", color=_LINE, label="checkpoint (kept in the run)")
        ax.set_yticks([])
        ax.set_title("checkpoints", loc="left", fontsize=10)
        text = "no metrics saved with these checkpoints" if entries else "no checkpoints yet"
        ax.text(0.5, 0.75, text, transform=ax.transAxes, ha="center", va="center", color="#555555")
        return
    points = [(e.step, metric_value(e.metrics.get(name))) for e in entries if name in e.metrics]
    xs = [s for s, v in points if v is not None]
    ys = [v for _, v in points if v is not None]
    ax.plot(xs, ys, "-o", color=_LINE, ms=4, lw=1.5, label="checkpoint (kept in the run)")
    bad = [s for s, v in points if v is None]
    if bad:  # the metric itself was NaN/Inf: no height to draw it at, so at the top
        ax.plot(
            bad,
            [0.95] * len(bad),
            "X",
            color=_POISONED,
            ms=9,
            label="metric NaN/Inf",
            transform=ax.get_xaxis_transform(),
            clip_on=False,
        )
    value_of = {s: v for s, v in points if v is not None}
    if latest is not None and latest.step in value_of:
        ax.plot(
            [latest.step],
            [value_of[latest.step]],
            "o",
            ms=20,
            mfc="none",
            mec="#2ca02c",
            mew=2,
            zorder=6,  # a ring around the best's star when the latest is the best
            label=f"latest: {latest.name}",
        )
    if best is not None and best.step in value_of:
        ax.plot(
            [best.step],
            [value_of[best.step]],
            "*",
            ms=17,
            color=_BEST,
            mec="black",
            mew=0.7,
            zorder=5,
            label=best_label,
        )
    ax.set_title(name, loc="left", fontsize=10)  # across, not up the side: long names stay readable
    ax.margins(y=0.12)  # room for the star, the ring and the NaN crosses at the ends


def _figure_legend(fig: Figure, axes: Sequence[Axes], title: str) -> None:
    """The title, and under it one legend for the whole figure (each label once), above the panels.

    One box above the panels, as the constrained layout does not stack a suptitle and an
    outside legend (they would overlap).
    """
    seen: dict[str, Any] = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        for handle, label in zip(handles, labels, strict=True):
            seen.setdefault(label, handle)
    if not seen:
        fig.suptitle(title, fontsize=12)
        return
    fig.legend(
        list(seen.values()),
        list(seen),
        loc="outside upper center",
        ncol=min(3, len(seen)),
        fontsize=9,
        frameon=False,
        title=title,
        title_fontsize=12,
    )


def plot_metrics(
    run: str | os.PathLike[str] | Sequence[CheckpointEntry],
    out: str | os.PathLike[str],
    *,
    monitor: str | None = None,
    mode: str = "min",
    name: str | None = None,
) -> Path:
    """Draw every metric of a run over its steps, best and kept checkpoints marked, to a picture file.

    Reads the run only (it may be saving meanwhile); the picture is written
    atomically. See :func:`draw_metrics` for what is drawn.

    Args:
        run (str | PathLike | Sequence[CheckpointEntry]): a run folder (or its
            URL) written by :class:`torchkeep.Checkpointer`, or its entries.
        out (str | PathLike): the picture; its suffix picks the format (``.png``, ``.svg``, ``.pdf``, …).
        monitor (str | None, default None): the metric that marks the best checkpoint.
        mode (str, default "min"): ``"min"`` or ``"max"``.
        name (str | None, default None): the run's name in the title (default: the folder's name).

    Returns:
        The picture's path.

    Raises:
        MissingExtraError: matplotlib is not installed (``pip install 'torchkeep[plot]'``).
        UnsupportedSuffixError: ``out``'s suffix is not a picture format.

    Example:
        >>> torchkeep.plots.plot_metrics("runs/exp1", "metrics.png", monitor="val_loss")
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    picture_format(out)
    if isinstance(run, str | os.PathLike):
        name = name or Path(run).name or str(run)
        entries = RunReader(run).entries()  # reads only: safe while the run saves
    else:
        entries = list(run)
    return _save(draw_metrics(entries, monitor=monitor, mode=mode, name=name), out)


# --- relative change per tensor --------------------------------------------------------------------

# status -> (row colour, legend label, tally word); rows of unmeasured statuses are tinted whole
_BANDS = {
    "unchanged": ("#d9d9d9", "unchanged (bitwise equal), e.g. frozen", "unchanged"),
    "shape": ("#ffbb78", "shape differs (replaced)", "shape differs"),
    "only_a": ("#c5b0d5", "only in A (removed)", "only in A"),
    "only_b": ("#98df8a", "only in B (new)", "only in B"),
}
# changed, but with no finite ratio: a marker at the left edge of the row
_MARKS = {
    "from_zero": (">", "changed from all zeros (no ratio)", "from zeros"),
    "nonfinite": ("X", "NaN/Inf on a side (no ratio)", "NaN/Inf"),
}
_TALLY = {"changed": "changed", "not_float": "integer/bool not drawn"} | {
    k: v[2] for k, v in {**_BANDS, **_MARKS}.items()
}


def _scale(changes: Sequence[TensorChange], scale: str) -> str:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if scale != "auto":
        return scale
    moved = [c.relative for c in changes if c.status == "changed" and c.relative]
    # log when the changes span more than three decades: on a linear axis the small ones vanish
    return "log" if moved and max(moved) / min(moved) > 1e3 else "linear"


def draw_changes(
    changes: Sequence[TensorChange],
    *,
    scale: str = "auto",
    title: str | None = None,
    subtitle: str | None = None,
) -> Figure:
    """A figure of ``||B - A|| / ||A||`` per tensor, one horizontal bar each, in model order (top first).

    Tensors that did not change (frozen ones) are grey rows, so a frozen
    backbone is a grey block; replaced, removed and new tensors have rows of
    their own colours, tensors changed from all zeros or holding NaN/Inf a
    red mark. Integer and bool tensors (``num_batches_tracked``) are counted
    in the title, not drawn. With more rows than fit one label each, every
    k-th row is labelled.

    Args:
        changes (Sequence[TensorChange]): from :func:`torchkeep.stats.relative_changes`.
        scale (str, default "auto"): ``"linear"``, ``"log"``, or ``"auto"``
            (log when the changes span more than three decades).
        title (str | None, default None): the title.
        subtitle (str | None, default None): a second line (e.g. the two files).

    Returns:
        A matplotlib ``Figure`` (Agg canvas).

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    axis = _scale(changes, scale)
    drawn = [c for c in changes if c.status != "not_float"]
    rows = max(1, len(drawn))
    height = min(max(2.6, 0.17 * rows + 1.6), 30.0)
    fig = _figure(10.0, height, layout="constrained")  # room for the title lines and the legend
    ax = fig.subplots()
    measured = [(i, c.relative) for i, c in enumerate(drawn) if c.status == "changed" and c.relative]
    top = max((r for _, r in measured), default=1.0)
    for i, c in enumerate(drawn):
        if c.status in _BANDS:
            colour, label, _ = _BANDS[c.status]
            ax.axhspan(i - 0.5, i + 0.5, color=colour, lw=0, label=label)
    if measured:
        ax.barh([i for i, _ in measured], [r for _, r in measured], height=0.8, color=_LINE, label="changed")
    for status, (marker, label, _) in _MARKS.items():
        at = [i for i, c in enumerate(drawn) if c.status == status]
        if at:  # x in axes coordinates: at the left edge whatever the scale
            ax.plot(
                [0.012] * len(at),
                at,
                marker,
                color=_POISONED,
                ms=7,
                ls="none",
                label=label,
                transform=ax.get_yaxis_transform(),
            )
    ax.set_ylim(rows - 0.5, -0.5)  # model order, first tensor on top
    if axis == "log":
        ax.set_xscale("log")
        low = min((r for _, r in measured), default=1e-6)
        ax.set_xlim(10 ** math.floor(math.log10(low)) / 2, top * 2)
    else:
        ax.set_xlim(0, top * 1.1)
        if rows <= 60:  # few enough rows to print each value
            for i, r in measured:
                ax.text(r, i, f" {r:.3g}", va="center", fontsize=7)
    per_row = height * 72 * 0.8 / rows  # points of height per row
    every = max(1, math.ceil(8.0 / per_row))
    ticks = list(range(0, len(drawn), every))
    ax.set_yticks(ticks)
    ax.set_yticklabels([drawn[i].key for i in ticks], fontsize=7 if rows > 40 else 8)
    ax.set_xlabel("relative change  ||B - A|| / ||A||" + ("  (log scale)" if axis == "log" else ""))
    ax.set_ylabel("tensor, in A's order" + (f" (1 in {every} labelled)" if every > 1 else ""))
    if rows > 40:  # a tall picture: the scale at the top too
        ax.tick_params(axis="x", top=True, labeltop=True)
    ax.grid(True, axis="x", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        ax.legend(
            list(unique.values()),
            list(unique),
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=8,
            frameon=False,
        )
    counts: dict[str, int] = {}
    for c in changes:
        counts[c.status] = counts.get(c.status, 0) + 1
    tally = ", ".join(f"{n} {_TALLY.get(status, status)}" for status, n in counts.items())
    head = title or "How far each tensor moved from A to B"
    lines = [head, *([subtitle] if subtitle else []), tally]
    fig.suptitle("\n".join(lines), fontsize=10)
    return fig


def plot_changes(
    a: Source,
    b: Source,
    out: str | os.PathLike[str],
    *,
    scale: str = "auto",
    title: str | None = None,
    names: tuple[str, str] | None = None,
) -> Path:
    """Draw the relative change per tensor (``||B - A|| / ||A||``) from ``a`` to ``b`` to a picture file.

    Frozen tensors show as grey rows (no change at all), so "did the
    backbone stay frozen during fine-tuning" is answered at a glance.

    Args:
        a, b (nn.Module | str | PathLike | Mapping[str, Tensor]): before and
            after: models, state dicts, or any files :func:`torchkeep.load_weights` reads.
        out (str | PathLike): the picture; its suffix picks the format (``.png``, ``.svg``, ``.pdf``, …).
        scale (str, default "auto"): ``"linear"``, ``"log"`` or ``"auto"``.
        title (str | None, default None): the title.
        names (tuple[str, str] | None, default None): what to call A and B
            (default: their paths, or "a state dict" / the model's class).

    Returns:
        The picture's path.

    Raises:
        MissingExtraError: matplotlib is not installed (``pip install 'torchkeep[plot]'``).
        UnsupportedSuffixError: ``out``'s suffix is not a picture format.
        The errors of :func:`torchkeep.load_weights` for files.

    Example:
        >>> torchkeep.plots.plot_changes("pretrained.safetensors", "finetuned.safetensors", "changes.png")
    """
    _scale([], scale)  # a bad scale or target fails before anything is read
    picture_format(out)
    changes = relative_changes(a, b)

    def shown(x: Source) -> str:
        if isinstance(x, str | os.PathLike):
            return str(x)
        return "a state dict" if isinstance(x, Mapping) else f"a {type(x).__name__}"

    name_a, name_b = names if names is not None else (shown(a), shown(b))
    fig = draw_changes(changes, scale=scale, title=title, subtitle=f"A: {name_a}   B: {name_b}")
    return _save(fig, out)

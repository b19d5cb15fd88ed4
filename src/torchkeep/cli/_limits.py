"""``--raise-limit NAME=VALUE``: the CLI side of :class:`~torchkeep.Limits`."""

from __future__ import annotations

import dataclasses

import typer

from torchkeep.safety import DEFAULT_LIMITS, Limits

__all__ = ["RAISE_LIMIT_HELP", "parse_limits"]

RAISE_LIMIT_HELP = "Raise a reading limit, e.g. max_bytes=2000000000000 (repeatable; see torchkeep.Limits)."


def parse_limits(items: list[str] | None) -> Limits:
    """A :class:`Limits` with the defaults changed by ``NAME=VALUE`` items.

    Raises:
        typer.BadParameter: an item is malformed or names no limit.
    """
    names = {f.name for f in dataclasses.fields(Limits)}
    changes: dict[str, int] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in names:
            raise typer.BadParameter(
                f"{item!r}: write NAME=VALUE with NAME one of {', '.join(sorted(names))}",
                param_hint="--raise-limit",
            )
        try:
            changes[name] = int(value.replace(",", "").replace("_", ""))
        except ValueError:
            raise typer.BadParameter(
                f"{item!r}: the value must be an integer", param_hint="--raise-limit"
            ) from None
    return dataclasses.replace(DEFAULT_LIMITS, **changes)

"""The ``torchkeep`` command: a thin layer over the library, one module per command.

Library errors become one red line with the fix and a non-zero exit code,
never a traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from torchkeep.errors import (
    CheckpointError,
    DistributedError,
    DoesNotFitError,
    TorchkeepError,
    UnreadableFileError,
    UnsafeError,
    UsageError,
)

__all__ = ["app", "main"]

app = typer.Typer(
    name="torchkeep",
    help="Save, load, inspect, resume and reuse PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

# library error -> exit code, by group (first match wins); the message itself says what to do.
# 1 and 2 are the commands' own verdicts: `verify` found a damaged checkpoint, `diff` found
# differences, `scan` found an unsafe file (2).
EXIT_CODES: dict[type[BaseException], int] = {
    CheckpointError: 7,  # a run's problem: none valid, newer format, another writer, ...
    DistributedError: 8,  # a rank of a distributed job failed
    FileNotFoundError: 3,  # no such file or folder
    IsADirectoryError: 3,
    UnreadableFileError: 4,  # damaged, unknown format, holds something else
    UnsafeError: 5,  # would run code, or exceeds the limits
    DoesNotFitError: 6,  # keys / shapes / parts do not fit the model
    UsageError: 9,  # an argument or environment torchkeep cannot use
}


def exit_code(err: BaseException) -> int:
    """The exit code for a library error (1 when no row fits)."""
    for kind, code in EXIT_CODES.items():
        if isinstance(err, kind):
            return code
    return 1


def _register() -> None:
    from torchkeep.cli import average, convert, demo, diff, export_step, inspect, ls, scan, verify

    app.command("inspect")(inspect.inspect_command)
    app.command("diff")(diff.diff_command)
    app.command("convert")(convert.convert_command)
    app.command("average")(average.average_command)
    app.command("ls")(ls.ls_command)
    app.command("verify")(verify.verify_command)
    app.command("export-step")(export_step.export_step_command)
    app.command("scan")(scan.scan_command)
    app.command("demo")(demo.demo_command)


_register()


@functools.cache
def _command() -> Any:  # a click Command (typer vendors its own click)
    # Built once per process: typer reads every command's signature (and evaluates its
    # annotations) to build it, which need not happen again for each call.
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; library errors print one line and exit non-zero."""
    try:
        _command().main(args=argv, prog_name="torchkeep", standalone_mode=True)
    except TorchkeepError as err:
        # escaped: a message's own brackets ("pip install 'torchkeep[plot]'") are text, not rich markup
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", markup=True, highlight=False)
        sys.exit(exit_code(err))
    except OSError as err:  # disk full, permission denied: say it plainly
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", markup=True, highlight=False)
        sys.exit(1)

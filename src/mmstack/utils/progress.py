"""Progress bars and consoles. Everything human-facing goes to stderr so stdout stays clean for --json."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False)


def progress_enabled() -> bool:
    """Bars are shown on a terminal unless MMSTACK_NO_PROGRESS is set (tests and CI logs stay quiet)."""
    return sys.stderr.isatty() and not os.environ.get("MMSTACK_NO_PROGRESS")


def make_progress(*extra_columns) -> Progress:
    """A rich progress bar on stderr with count, elapsed and remaining time, plus ``extra_columns``."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not progress_enabled(),
        transient=False,
    )

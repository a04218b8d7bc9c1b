"""``mmstack world``: generate and parse shapes-world data."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="The shapes world: generate synthetic data with known ground truth, parse images.", no_args_is_help=True
)

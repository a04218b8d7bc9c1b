"""``mmstack data``: inspect, convert and clean data sets."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Data sets: validate, convert and clean image-text pairs and conversations.", no_args_is_help=True
)

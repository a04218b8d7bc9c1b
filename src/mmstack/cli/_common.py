"""Shared CLI plumbing: --json output, rich tables, one-line errors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables.")
stdout = Console(highlight=False)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


def emit(result: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Print ``result`` as one JSON object (``--json``) or for humans (``render`` or a key/value table)."""
    if as_json:
        print(json.dumps(_jsonable(result), ensure_ascii=False, default=str))
        return
    if render is not None:
        render(result)
    else:
        print_kv(result)


def print_kv(result: dict[str, Any], title: str | None = None) -> None:
    """A two-column table of scalar entries; nested values are shown as compact JSON."""
    table = Table(title=title, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for k, v in result.items():
        table.add_row(str(k), _fmt(v))
    stdout.print(table)


def print_rows(rows: Iterable[dict[str, Any]], title: str | None = None, columns: list[str] | None = None) -> None:
    """A table with one row per dict."""
    rows = list(rows)
    if not rows:
        stdout.print(f"[dim]{title or 'no rows'}: empty[/dim]")
        return
    columns = columns or list(rows[0].keys())
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in columns))
    stdout.print(table)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(_jsonable(v), ensure_ascii=False, default=str)
    return str(v)

"""The demo's HTML report: one section per stage, with its metrics, pictures and timing."""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING

from mmstack.utils.atomic import atomic_write_text

if TYPE_CHECKING:
    from mmstack.demo.pipeline import DemoContext, Stage

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { margin-bottom: 0; } section { border-top: 1px solid #ddd; margin-top: 2em; }
table.metrics { border-collapse: collapse; } table.metrics td { padding: 2px 10px; border-bottom: 1px solid #eee; }
img { max-width: 100%; image-rendering: pixelated; } .meta { color: #777; font-size: 90%; }
"""


def metrics_table(metrics: dict) -> str:
    """A small HTML table of scalar metrics (nested values as compact JSON)."""
    rows = []
    for k, v in metrics.items():
        text = f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
        rows.append(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(text)}</td></tr>")
    return f"<table class='metrics'>{''.join(rows)}</table>"


def write_report(ctx: DemoContext, stages: list[Stage]) -> None:
    """Write ``report.html`` in the demo folder from the results of ``stages``."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>mmstack demo</title><style>{_STYLE}</style>"]
    parts.append("<h1>mmstack demo</h1><p class='meta'>The whole pipeline on the shapes world.</p>")
    for stage in stages:
        res = ctx.results[stage.name]
        note = "cached" if res.cached else "ran"
        parts.append(
            f"<section id='{stage.name}'><h2>{html.escape(stage.title)}</h2>"
            f"<p class='meta'>stage <code>{stage.name}</code>: {res.seconds:.1f} s ({note})</p>"
            f"{res.html}{metrics_table(res.metrics)}</section>"
        )
    atomic_write_text(ctx.path("report.html"), "\n".join(parts))

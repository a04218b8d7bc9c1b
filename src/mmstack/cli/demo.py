"""``mmstack demo``: the main job, the whole pipeline on the shapes world with an HTML report."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(Path("demo-output"), "--out", help="Folder for models, collections and report."),
    force: bool = typer.Option(False, "--force", help="Re-run every stage even when its cache is valid."),
    only: list[str] = typer.Option(None, "--only", help="Run only these stages (and what they need)."),
) -> None:
    """Run the demo pipeline (generate, train, evaluate, index, ask, generate) and write report.html."""
    from mmstack.demo.pipeline import run_demo

    run_demo(out, force=force, only=only or None)

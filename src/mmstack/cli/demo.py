"""``mmstack demo``: the main job, the whole pipeline on the shapes world with an HTML report."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(Path("demo-output"), "--out", help="Folder for models, collections and report."),
    force: bool = typer.Option(False, "--force", help="Re-run every stage even when its cache is valid."),
    only: list[str] = typer.Option(None, "--only", help="Run only these stages (and what they need)."),
    config: Path = typer.Option(None, "--config", help="Demo config (default: configs/demo.yaml)."),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny sizes: the whole pipeline in about a minute."),
) -> None:
    """Run the demo pipeline (generate, train, evaluate, index, ask, generate) and write report.html."""
    from mmstack.demo.pipeline import run_demo

    run_demo(out, config_path=config, force=force, only=only or None, smoke=smoke)

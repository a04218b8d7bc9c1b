"""``mmstack train llava``: the bridge VLM recipe (stages 0, 1, 2, 3 or all).

Extra arguments are dotted config overrides, e.g. ``--stage2.train.max_steps 50`` or ``stage2.language=lora``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mmstack.cli._common import JSON_OPTION
from mmstack.cli.train_common import MAX_STEPS_OPTION, emit_main

OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}


def train_llava(
    ctx: typer.Context,
    config: Path = typer.Option(Path("llava-demo"), "--config", help="Recipe YAML (or a shipped name: llava-demo)."),
    data: Path = typer.Option(None, "--data", help="Training data folder (sets data.train): a shapes world."),
    out: Path = typer.Option(
        ..., "--out", help="Run folder: stage N writes OUT/stageN/model; OUT/model is the final model."
    ),
    stage: str = typer.Option(
        "all", "--stage", help="0 (LM pretraining), 1 (connector), 2 (instructions), 3 (final phase) or all."
    ),
    val: Path = typer.Option(None, "--val", help="Folder to evaluate VQA on after the last stage (sets data.val)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue or reuse stages found in OUT."),
    max_steps: int = MAX_STEPS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Train a LLaVA-style bridge VLM in stages and save a checkpoint per stage.

    Example: mmstack train llava --config configs/llava-demo.yaml --data world/train --out runs/vlm --stage all
    """
    from mmstack.config import load_config, merge, parse_overrides
    from mmstack.train.llava import STAGES, LlavaRecipeConfig, train_llava

    overrides = parse_overrides(list(ctx.args))
    if data is not None:
        overrides = merge(overrides, {"data": {"train": str(data)}})
    if val is not None:
        overrides = merge(overrides, {"data": {"val": str(val)}})
    if max_steps is not None:
        overrides = merge(overrides, {f"stage{s}": {"train": {"max_steps": max_steps}} for s in STAGES})
    cfg = load_config(LlavaRecipeConfig, _config_path(config), overrides=overrides)
    emit_main(train_llava(cfg, out, stage=stage, resume=resume), as_json)


def _config_path(path: Path) -> Path:
    from mmstack.config import configs_dir

    if path.exists():
        return path
    shipped = configs_dir() / (path.name if path.suffix else f"{path.name}.yaml")
    return shipped if shipped.is_file() else path

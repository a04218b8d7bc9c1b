"""``mmstack train vq`` and ``mmstack train native``: the native model's image tokenizer and decoder.

Extra arguments are dotted config overrides, e.g. ``--train.max_steps 200`` or ``model.head=per_modality``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mmstack.cli._common import JSON_OPTION
from mmstack.cli.train_common import MAX_STEPS_OPTION, emit_main

OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}


def train_vq(
    ctx: typer.Context,
    config: Path = typer.Option(Path("vq-demo"), "--config", help="Recipe YAML (or a shipped name: vq-demo)."),
    data: Path = typer.Option(..., "--data", help="Training images: a shapes world (pairs.jsonl) or any pairs layout."),
    out: Path = typer.Option(..., "--out", help="Checkpoint folder to write (run files are kept inside)."),
    val: Path = typer.Option(None, "--val", help="Images to measure reconstruction PSNR and codebook usage on."),
    max_steps: int = MAX_STEPS_OPTION,
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT's train_state if present."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Train the VQ image tokenizer (patch VQ-VAE, EMA codebook with k-means init and dead-code restart).

    Example: mmstack train vq --config configs/vq-demo.yaml --data world/train --val world/val --out models/vq
    """
    from mmstack.train.vq import VQRecipeConfig
    from mmstack.train.vq import train_vq as run

    cfg = _load(VQRecipeConfig, config, ctx, max_steps)
    emit_main(run(cfg, data, out, val=val, resume=resume).as_dict(), as_json)


def train_native(
    ctx: typer.Context,
    tokenizer: Path = typer.Option(..., "--tokenizer", help="The VQ tokenizer checkpoint (mmstack train vq)."),
    config: Path = typer.Option(Path("native-demo"), "--config", help="Recipe YAML (or a shipped name)."),
    data: Path = typer.Option(..., "--data", help="Training data: a shapes world (pairs, scenes, clips)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint folder to write (run files are kept inside)."),
    val: Path = typer.Option(None, "--val", help="A shapes world to evaluate on after training."),
    max_steps: int = MAX_STEPS_OPTION,
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT's train_state if present."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Train the native decoder over text and image codes (text->image, image->text, clip->text mixture).

    Example: mmstack train native --tokenizer models/vq --data world/train --val world/val --out models/native
    """
    from mmstack.train.native import NativeRecipeConfig
    from mmstack.train.native import train_native as run

    cfg = _load(NativeRecipeConfig, config, ctx, max_steps)
    emit_main(run(cfg, data, tokenizer, out, val=val, resume=resume).as_dict(), as_json)


def _load(cls, config: Path, ctx: typer.Context, max_steps: int | None):
    from mmstack.config import configs_dir, load_config, merge, parse_overrides

    overrides = parse_overrides(list(ctx.args))
    if max_steps is not None:
        overrides = merge(overrides, {"train": {"max_steps": max_steps}})
    if not config.exists():
        shipped = configs_dir() / (config.name if config.suffix else f"{config.name}.yaml")
        config = shipped if shipped.is_file() else config
    return load_config(cls, config, overrides=overrides)

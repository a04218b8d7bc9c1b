"""``mmstack train reward|dpo|ppo``: preference alignment of a bridge VLM.

Extra arguments are dotted config overrides, e.g. ``--dpo.beta 0.2``, ``trainable.language=lora`` or
``--train.max_steps 50``. ``register(app)`` adds the three commands to the ``train`` sub-app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmstack.cli._common import JSON_OPTION
from mmstack.cli.train_common import MAX_STEPS_OPTION, emit_main

OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}
MODEL_OPTION = typer.Option(None, "--model", help="Bridge VLM checkpoint to start from (sets model).")
DATA_OPTION = typer.Option(
    None, "--data", help="Preference pairs: a shapes-world folder or a JSONL file (sets data.train)."
)
OUT_OPTION = typer.Option(..., "--out", help="Run folder; the checkpoint is written to OUT/model.")
RESUME_OPTION = typer.Option(True, "--resume/--no-resume", help="Continue (or reuse) a run found in OUT.")


def _load(cls: type, config: Path, ctx: typer.Context, **fields: Any):
    """The recipe config from YAML (a path or a shipped name), the CLI's options and dotted overrides."""
    from mmstack.config import configs_dir, load_config, merge, parse_overrides

    overrides = parse_overrides(list(ctx.args))
    for dotted, value in fields.items():
        if value is not None:
            node: dict[str, Any] = {}
            cursor = node
            *parents, leaf = dotted.split(".")
            for part in parents:
                cursor = cursor.setdefault(part, {})
            cursor[leaf] = value if isinstance(value, int) else str(value)  # paths as text, --max-steps as is
            overrides = merge(overrides, node)
    if not config.exists():
        shipped = configs_dir() / (config.name if config.suffix else f"{config.name}.yaml")
        config = shipped if shipped.is_file() else config
    return load_config(cls, config, overrides=overrides)


def train_reward(
    ctx: typer.Context,
    config: Path = typer.Option(Path("reward-demo"), "--config", help="Recipe YAML (or a shipped name: reward-demo)."),
    model: Path = MODEL_OPTION,
    data: Path = DATA_OPTION,
    val: Path = typer.Option(None, "--val", help="Held-out pairs for the pairwise accuracy (sets data.val)."),
    out: Path = OUT_OPTION,
    resume: bool = RESUME_OPTION,
    max_steps: int = MAX_STEPS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Train a multimodal reward model (bridge VLM + scalar head + the answer's likelihood, Bradley-Terry loss).

    Example: mmstack train reward --model runs/vlm/model --data world/train --val world/val --out runs/reward
    """
    from mmstack.train.align.reward import RewardRecipeConfig
    from mmstack.train.align.reward import train_reward as run

    cfg = _load(
        RewardRecipeConfig,
        config,
        ctx,
        model=model,
        **{"data.train": data, "data.val": val, "train.max_steps": max_steps},
    )
    emit_main(run(cfg, out, resume=resume), as_json)


def train_dpo(
    ctx: typer.Context,
    config: Path = typer.Option(Path("dpo-demo"), "--config", help="Recipe YAML (or a shipped name: dpo-demo)."),
    model: Path = MODEL_OPTION,
    data: Path = DATA_OPTION,
    eval_data: Path = typer.Option(
        None, "--eval", help="World folder for hallucination + VQA before/after (sets eval.data)."
    ),
    out: Path = OUT_OPTION,
    resume: bool = RESUME_OPTION,
    max_steps: int = MAX_STEPS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Align a bridge VLM with DPO against a frozen reference copy (cached reference log-probs).

    Example: mmstack train dpo --model runs/vlm/model --data world/train --eval world/val --out runs/dpo
    """
    from mmstack.train.align.dpo import DpoRecipeConfig
    from mmstack.train.align.dpo import train_dpo as run

    fields = {"data.train": data, "eval.data": eval_data, "train.max_steps": max_steps}
    cfg = _load(DpoRecipeConfig, config, ctx, model=model, **fields)
    emit_main(run(cfg, out, resume=resume), as_json)


def train_ppo(
    ctx: typer.Context,
    config: Path = typer.Option(Path("ppo-demo"), "--config", help="Recipe YAML (or a shipped name: ppo-demo)."),
    model: Path = MODEL_OPTION,
    reward: Path = typer.Option(None, "--reward", help="Reward model checkpoint (from `mmstack train reward`)."),
    data: Path = DATA_OPTION,
    eval_data: Path = typer.Option(
        None, "--eval", help="World folder for hallucination + VQA before/after (sets eval.data)."
    ),
    out: Path = OUT_OPTION,
    resume: bool = RESUME_OPTION,
    max_steps: int = MAX_STEPS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Align a bridge VLM with PPO against a reward model (KL penalty to the reference, value model, GAE).

    Example: mmstack train ppo --model runs/vlm/model --reward runs/reward/model --data world/train --out runs/ppo
    """
    from mmstack.train.align.ppo import PpoRecipeConfig
    from mmstack.train.align.ppo import train_ppo as run

    cfg = _load(
        PpoRecipeConfig,
        config,
        ctx,
        model=model,
        reward=reward,
        **{"data.train": data, "eval.data": eval_data, "train.max_steps": max_steps},
    )
    emit_main(run(cfg, out, resume=resume), as_json)


def register(app: typer.Typer) -> None:
    """Add ``reward``, ``dpo`` and ``ppo`` to the ``train`` sub-app."""
    app.command("reward", context_settings=OVERRIDES)(train_reward)
    app.command("dpo", context_settings=OVERRIDES)(train_dpo)
    app.command("ppo", context_settings=OVERRIDES)(train_ppo)

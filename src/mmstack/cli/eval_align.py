"""``mmstack eval reward`` (pairwise accuracy) and ``mmstack eval hallucination`` (rate against the ground truth).

``register(app)`` adds both commands to the ``eval`` sub-app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmstack.cli._common import JSON_OPTION, emit, print_kv, print_rows


def eval_reward(
    model: Path = typer.Option(..., "--model", help="Reward model checkpoint (OUT/model of `mmstack train reward`)."),
    data: Path = typer.Option(..., "--data", help="Preference pairs: a shapes-world folder or a JSONL file."),
    limit: int = typer.Option(0, "--limit", help="Use the first N pairs only (0 = all)."),
    kinds: str = typer.Option("", "--kinds", help="Comma-separated rejection kinds to keep (default: all)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Pairs scored together."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Pairwise accuracy: how often the chosen answer scores above the rejected one, by rejection kind.

    Example: mmstack eval reward --model runs/reward/model --data world/val --json
    """
    from mmstack.errors import ConfigError
    from mmstack.eval.alignment import pairwise_accuracy
    from mmstack.models.reward import RewardModel

    if limit < 0 or batch_size <= 0:
        raise ConfigError("--limit must be >= 0 and --batch-size > 0")
    rm = RewardModel.from_pretrained(_checkpoint(model))
    wanted = [k.strip() for k in kinds.split(",") if k.strip()]
    result = pairwise_accuracy(rm, data, kinds=wanted, limit=limit, batch_size=batch_size)
    emit({"model": str(model), "data": str(data), **result}, as_json, render=_render_reward)


def eval_hallucination(
    model: Path = typer.Option(..., "--model", help="A bridge VLM checkpoint (e.g. OUT/model of `train dpo`)."),
    data: Path = typer.Option(..., "--data", help="A shapes-world folder (scenes.jsonl is the ground truth)."),
    limit: int = typer.Option(0, "--limit", help="Ask about the first N scenes only (0 = all)."),
    vqa: bool = typer.Option(False, "--vqa/--no-vqa", help="Also report VQA accuracy on the folder's questions."),
    batch_size: int = typer.Option(64, "--batch-size", help="Prompts answered together."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Hallucination rate: answers naming a shape or colour absent from the image (and optionally VQA).

    Example: mmstack eval hallucination --model runs/dpo/model --data world/val --vqa --json
    """
    from mmstack.errors import ConfigError
    from mmstack.eval.alignment import evaluate_alignment
    from mmstack.models.bridge import BridgeModel

    if limit < 0 or batch_size <= 0:
        raise ConfigError("--limit must be >= 0 and --batch-size > 0")
    vlm = BridgeModel.from_pretrained(_checkpoint(model))
    result = evaluate_alignment(vlm, data, limit=limit or None, vqa=vqa, batch_size=batch_size)
    emit({"model": str(model), **result}, as_json, render=_render_hallucination)


def _checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder whose checkpoint is ``OUT/model``."""
    nested = path / "model"
    return nested if not (path / "config.json").is_file() and (nested / "config.json").is_file() else path


def _render_reward(result: dict[str, Any]) -> None:
    print_kv({k: result[k] for k in ("model", "data", "accuracy", "margin", "n")}, title="reward model")
    rows = [{"rejection": k, "accuracy": v["accuracy"], "n": v["n"]} for k, v in result["by_kind"].items()]
    print_rows(rows, title="by rejection kind")


def _render_hallucination(result: dict[str, Any]) -> None:
    h = result["hallucination"]
    head = {
        "model": result["model"],
        **{k: h[k] for k in ("data", "rate", "word_rate", "object_rate", "mention_rate", "n")},
    }
    print_kv(head, title="hallucination")
    print_rows([{"kind": k, **v} for k, v in h["by_kind"].items()], title="by prompt kind")
    print_rows(h["examples"], title="examples")
    if "vqa" in result:
        print_kv({"vqa_accuracy": result["vqa"]["accuracy"], "n": result["vqa"]["n"]}, title="VQA")


def register(app: typer.Typer) -> None:
    """Add ``reward`` and ``hallucination`` to the ``eval`` sub-app."""
    app.command("reward")(eval_reward)
    app.command("hallucination")(eval_hallucination)

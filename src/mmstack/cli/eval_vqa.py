"""``mmstack eval vqa``: VQA accuracy of a bridge VLM on a data folder, by question kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmstack.cli._common import JSON_OPTION, emit, print_kv, print_rows


def vqa(
    model: Path = typer.Option(..., "--model", help="A bridge checkpoint folder (or an HF Llava folder)."),
    data: Path = typer.Option(..., "--data", help="A folder with conversations.json (and clips.jsonl)."),
    limit: int = typer.Option(0, "--limit", help="Use the first N records only (0 = all)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Questions answered together."),
    clips: bool = typer.Option(True, "--clips/--no-clips", help="Also ask the clip (motion) questions."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Answer every question of DATA and report VQA accuracy overall and by question kind.

    Example: mmstack eval vqa --model runs/vlm/model --data world/val --json
    """
    import torch

    from mmstack.errors import ConfigError
    from mmstack.eval.vqa import evaluate_vqa
    from mmstack.models.bridge import BridgeModel

    if limit < 0 or batch_size <= 0:
        raise ConfigError("--limit must be >= 0 and --batch-size > 0")
    torch.set_grad_enabled(False)
    vlm = BridgeModel.from_pretrained(model)
    result = evaluate_vqa(vlm, data, limit=limit or None, batch_size=batch_size, clips=clips)
    emit({"model": str(model), **result}, as_json, render=_render)


def _render(result: dict[str, Any]) -> None:
    print_kv({k: result[k] for k in ("model", "data", "accuracy", "image_accuracy", "n")}, title="VQA")
    rows = [{"kind": k, "accuracy": v["accuracy"], "n": v["n"]} for k, v in result["by_kind"].items()]
    print_rows(rows, title="by question kind")
    print_rows(result["examples"], title="examples", columns=["question", "answers", "prediction", "score"])

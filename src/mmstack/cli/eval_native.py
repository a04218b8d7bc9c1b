"""``mmstack eval native``: generation, captioning, validity and reconstruction of a native checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmstack.cli._common import JSON_OPTION, emit, print_kv, print_rows

OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}


def eval_native(
    ctx: typer.Context,
    model: Path = typer.Option(..., "--model", help="A native checkpoint folder (mmstack train native)."),
    data: Path = typer.Option(..., "--data", help="A shapes-world folder (scenes.jsonl), e.g. the val split."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Object accuracy of generated images (parser), captioning accuracy, valid-image rate, PSNR.

    Extra arguments set NativeEvalConfig fields, e.g. ``--n_generate 50 --guidance_scales [1,2,3,5]``.
    """
    from mmstack.config import load_config, parse_overrides
    from mmstack.eval.native import NativeEvalConfig, evaluate_native
    from mmstack.models.native import NativeModel

    cfg = load_config(NativeEvalConfig, {}, parse_overrides(list(ctx.args)))
    net = NativeModel.from_pretrained(model)
    frames = net.card.get("training", {}).get("config", {}).get("data", {}).get("clip_frames", 4)
    result = {"model": str(model), **evaluate_native(net, data, cfg, clip_frames=frames)}
    emit(result, as_json, render=_render)


def _render(result: dict[str, Any]) -> None:
    print_kv({"model": result["model"], "data": result["data"]} | result["reconstruction"], title="reconstruction")
    gen = result.get("generation")
    if gen:
        rows = [{"guidance": g, **{k: v for k, v in s.items() if k != "objects"}} for g, s in gen["sweep"].items()]
        print_rows(rows, title=f"text -> image ({gen['prompts']} prompts), bounds {gen['bounds']}")
    for key in ("validity", "captioning", "clips"):
        if key in result:
            print_kv({k: v for k, v in result[key].items() if k != "examples"}, title=key)

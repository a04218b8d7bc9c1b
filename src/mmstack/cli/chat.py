"""``mmstack chat``: ask a bridge VLM about an image or a clip, once or interactively, with streaming."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from mmstack.cli._common import JSON_OPTION, emit

HELP = "commands: /image PATH (new image, new conversation), /reset, /quit; an empty line also quits"


def chat(
    question: str = typer.Argument(None, help="The question; leave it out for an interactive session."),
    model: Path = typer.Option(..., "--model", help="A bridge checkpoint folder (or an HF Llava folder)."),
    image: Path = typer.Option(None, "--image", help="Image to ask about."),
    video: Path = typer.Option(None, "--video", help="A clip: a folder of frame images (sorted by name)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Longest answer in tokens."),
    sample: bool = typer.Option(False, "--sample/--greedy", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature."),
    top_p: float = typer.Option(
        1.0, "--top-p", help="Nucleus sampling: keep the smallest set of tokens with this mass."
    ),
    stop: list[str] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    seed: int = typer.Option(None, "--seed", help="Sampling seed."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Chat with a VLM about an image (streaming the answer).

    Example: mmstack chat --model runs/vlm/model --image world/val/images/000001.png "What colour is the star?"
    """
    import torch

    from mmstack.models.bridge import BridgeModel
    from mmstack.models.bridge_generate import GenerationConfig

    torch.set_grad_enabled(False)
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_p=top_p,
        stop_strings=list(stop or []), seed=seed,
    )  # fmt: skip
    vlm = BridgeModel.from_pretrained(model)
    visual = _load_visual(vlm, image, video)
    if question is None:
        _interactive(vlm, visual, cfg)
        return
    answer = _answer(vlm, [{"from": "human", "value": question}], visual, cfg, stream=not as_json)
    emit({"model": str(model), "image": str(image) if image else None, "question": question, "answer": answer},
         as_json, render=lambda r: None)  # fmt: skip


def _load_visual(vlm: Any, image: Path | None, video: Path | None) -> dict[str, Any]:
    from mmstack.data.images import IMAGE_SUFFIXES, load_image
    from mmstack.errors import DataError
    from mmstack.processing.video import load_frames

    if video is not None:
        frames = (
            sorted(p for p in Path(video).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if video.is_dir() else []
        )
        if not frames:
            raise DataError(f"--video {video}: expected a folder of frame images")
        return {"video": load_frames(frames, vlm.processor.config.video_frames)}
    return {"image": load_image(image)} if image is not None else {}


def _answer(vlm: Any, turns: list[dict], visual: dict[str, Any], cfg: Any, stream: bool) -> str:
    """Generate the reply to ``turns``; the placeholder goes into the first human turn."""
    from mmstack.models.bridge_generate import stream_text

    turns = [dict(t) for t in turns]
    if "image" in visual and "<image>" not in turns[0]["value"]:
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
    if "video" in visual and "<video>" not in turns[0]["value"]:
        turns[0]["value"] = "<video>\n" + turns[0]["value"]
    pieces = []
    for piece in stream_text(vlm, turns, image=visual.get("image"), video=visual.get("video"), config=cfg):
        pieces.append(piece)
        if stream:
            print(piece, end="", flush=True)
    if stream:
        print()
    return "".join(pieces).strip()


def _interactive(vlm: Any, visual: dict[str, Any], cfg: Any) -> None:
    from mmstack.data.images import load_image
    from mmstack.errors import MmstackError
    from mmstack.utils.progress import console

    console.print(HELP)
    turns: list[dict] = []
    for line in sys.stdin:
        text = line.strip()
        if not text or text == "/quit":
            break
        if text == "/reset" or text.startswith("/image "):
            turns = []
            if text.startswith("/image "):
                try:
                    visual = {"image": load_image(text.split(" ", 1)[1].strip())}
                except MmstackError as err:
                    console.print(f"[red]error:[/] {err}")
            console.print("(new conversation)")
            continue
        turns.append({"from": "human", "value": text})
        answer = _answer(vlm, turns, visual, cfg, stream=True)
        turns.append({"from": "gpt", "value": answer or "."})

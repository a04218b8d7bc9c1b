"""``mmstack world``: generate and parse shapes-world data."""

from __future__ import annotations

import time
from typing import Any

import typer

from mmstack.cli._common import JSON_OPTION, emit, print_kv, print_rows

app = typer.Typer(
    help="The shapes world: generate synthetic data with known ground truth, parse images.", no_args_is_help=True
)


@app.command("generate")
def generate(
    out: str = typer.Option(..., "--out", help="Dataset folder to write (replaced atomically if it is a world)."),
    n: int = typer.Option(..., "--n", help="Number of images (scenes)."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same arguments give byte-identical files."),
    image_size: int = typer.Option(64, "--image-size", help="Image width in pixels (>= 16)."),
    height: int | None = typer.Option(None, "--height", help="Image height in pixels (default: --image-size)."),
    split: str = typer.Option("train", "--split", help="train | val | compositional (held-out shape/colour pairs)."),
    clips: int = typer.Option(0, "--clips", help="Number of short clips of moving objects to add."),
    clip_frames: int = typer.Option(8, "--clip-frames", help="Frames per clip."),
    noise: float = typer.Option(0.0, "--noise", help="Gaussian pixel noise, std as a fraction of 255 (0-1)."),
    rotation: bool = typer.Option(False, "--rotation", help="Rotate objects by random angles."),
    texture: bool = typer.Option(False, "--texture", help="Grey textured backgrounds."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write images, pairs.jsonl, conversations.json, preferences.jsonl, scenes.jsonl, clips and world.json."""
    from mmstack.world.generate import generate_world

    t0 = time.perf_counter()
    summary = generate_world(
        out,
        n=n,
        seed=seed,
        split=split,
        image_size=image_size,
        clips=clips,
        height=height,
        clip_frames=clip_frames,
        noise=noise,
        rotation=rotation,
        texture=texture,
    )
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    emit(summary, as_json, render=_render_summary)


def _render_summary(summary: dict[str, Any]) -> None:
    keys = ("out", "split", "seed", "image_size", "n_scenes", "n_objects", "n_questions", "n_preferences", "n_clips")
    print_kv({k: summary[k] for k in keys} | {"held_out_pairs": [" ".join(p) for p in summary["held_out_pairs"]]})


@app.command("parse")
def parse(
    image: str = typer.Argument(..., help="A PNG/JPEG image of the shapes world (rendered or generated)."),
    rotation: str = typer.Option("auto", "--rotation", help="Search rotated templates: auto | on | off."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Print the objects found in IMAGE: shape, colour, size, cell, bounding box, fit score."""
    from mmstack.errors import ConfigError
    from mmstack.world.parser import load_image, parse_image

    modes = {"auto": None, "on": True, "off": False}
    if rotation not in modes:
        raise ConfigError(f"--rotation must be one of auto, on, off; got {rotation!r}")
    arr = load_image(image)
    objects = parse_image(arr, rotation=modes[rotation])
    result = {
        "image": image,
        "width": int(arr.shape[1]),
        "height": int(arr.shape[0]),
        "n_objects": len(objects),
        "objects": [o.to_dict() for o in objects],
    }
    emit(result, as_json, render=lambda r: print_rows(r["objects"], title=f"{image}: {r['n_objects']} objects"))


@app.command("sheet")
def sheet(
    world: str = typer.Argument(..., help="A folder written by `mmstack world generate`."),
    out: str = typer.Option(..., "--out", help="PNG file to write."),
    n: int = typer.Option(24, "--n", help="Number of images on the sheet."),
    cols: int = typer.Option(6, "--cols", help="Images per row."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write a contact sheet of the first N images with their caption and first question."""
    import json
    from pathlib import Path

    from mmstack.errors import ConfigError, DataError
    from mmstack.world.sheet import contact_sheet

    if n <= 0 or cols <= 0:
        raise ConfigError(f"--n and --cols must be >= 1; got {n} and {cols}")
    root = Path(world)
    scenes_file = root / "scenes.jsonl"
    if not scenes_file.is_file():
        raise DataError(f"{scenes_file} does not exist; pass a folder written by `mmstack world generate`")
    records = [json.loads(line) for line in scenes_file.read_text(encoding="utf-8").splitlines()[:n]]
    captions = []
    for r in records:
        q = r["questions"][0] if r["questions"] else None
        captions.append(r["caption"] + (f"\nQ: {q['question']} A: {q['answer']}" if q else ""))
    path = contact_sheet([root / r["image"] for r in records], captions, out, cols=cols)
    emit({"out": str(path), "n_images": len(records)}, as_json, render=print_kv)

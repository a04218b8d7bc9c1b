"""``mmstack generate`` (draw an image or a clip from a prompt) and ``mmstack caption`` (describe an image)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from mmstack.cli._common import JSON_OPTION, emit


def generate(
    prompt: str = typer.Argument(..., help="What to draw, e.g. 'a large red circle at the top left'."),
    model: Path = typer.Option(..., "--model", help="A native checkpoint folder (mmstack train native)."),
    out: Path = typer.Option(Path("generated.png"), "--out", help="PNG to write (a clip: one PNG per frame)."),
    video: int = typer.Option(0, "--video", help="Generate a clip of this many frames instead of an image."),
    guidance: float = typer.Option(1.5, "--guidance", help="Classifier-free guidance scale (1 = none)."),
    top_k: int = typer.Option(64, "--top-k", help="Sample among the k most likely codes."),
    temperature: float = typer.Option(0.5, "--temperature", help="Sampling temperature."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the sequence each step (no KV cache)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Draw an image (or a clip with --video K) from a text prompt with a native model."""
    from mmstack.models.native import NativeModel
    from mmstack.utils.atomic import atomic_write_bytes

    net = NativeModel.from_pretrained(model)
    t0 = time.perf_counter()
    gen = net.generate(
        prompt,
        "video" if video else "image",
        guidance=None if guidance == 1.0 else guidance,
        top_k=top_k,
        temperature=temperature,
        frames=max(video, 1),
        use_cache=not no_cache,
        seed=seed,
    )
    seconds = time.perf_counter() - t0
    frames = gen.outputs[0] if video else [gen.outputs[0]]
    paths = [out] if not video else [out.with_name(f"{out.stem}_{t:02d}{out.suffix or '.png'}") for t in range(video)]
    for img, path in zip(frames, paths, strict=True):
        atomic_write_bytes(path, _png(img))
    emit({"prompt": prompt, "out": [str(p) for p in paths], "seconds": round(seconds, 3), **_parse(frames[0])}, as_json)


def caption(
    image: Path = typer.Argument(..., help="An image to describe (PNG/JPEG)."),
    model: Path = typer.Option(..., "--model", help="A native checkpoint folder (mmstack train native)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Describe an image with a native model (greedy decoding)."""
    from mmstack.models.native import NativeModel

    net = NativeModel.from_pretrained(model)
    t0 = time.perf_counter()
    text = net.generate(str(image), "text").outputs[0]
    emit({"image": str(image), "caption": text, "seconds": round(time.perf_counter() - t0, 3)}, as_json)


def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _parse(img) -> dict:
    from mmstack.world.parser import parse_image

    objs = parse_image(img)
    return {"parsed": [f"{o.size} {o.colour} {o.shape} at {o.cell}" for o in objs]}

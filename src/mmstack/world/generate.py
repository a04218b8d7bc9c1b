"""Write a shapes-world dataset folder: images, pairs, conversations, preferences, scenes, clips, world.json.

Layout (paths inside files are relative to the folder)::

    DIR/images/000000.png        DIR/pairs.jsonl          {"image", "caption", "id"}
    DIR/conversations.json       LLaVA-Instruct records   DIR/preferences.jsonl {"image", "prompt", "chosen",
    DIR/scenes.jsonl             ground truth per image                          "rejected", "rejection"}
    DIR/clips/000000/frame_00.png and DIR/clips.jsonl    (with --clips K > 0)
    DIR/world.json               seed, split, sizes, vocabulary, held-out pairs, counts, generator version

The same arguments give byte-identical files (sorted JSON keys, no timestamps, one RNG stream per item),
and the folder is swapped in atomically, so an interrupted run never leaves half a dataset.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmstack.errors import ConfigError
from mmstack.utils.atomic import atomic_dir
from mmstack.utils.progress import make_progress
from mmstack.world.clips import clip_captions, clip_questions, render_clip, sample_clip
from mmstack.world.language import captions_for
from mmstack.world.preferences import preference_pairs_for
from mmstack.world.questions import questions_for
from mmstack.world.render import MIN_IMAGE_SIZE, render_scene
from mmstack.world.scene import check_split, sample_scene, scene_rng
from mmstack.world.vocab import GENERATOR_VERSION, HELD_OUT_PAIRS, WORLD, derive_seed

MAX_IMAGE_SIZE = 1024


@dataclass
class WorldConfig:
    """What ``generate_world`` makes. Errors name the CLI flag of the bad field."""

    n: int
    seed: int = 0
    split: str = "train"
    image_size: int = 64
    height: int | None = None
    clips: int = 0
    clip_frames: int = 8
    noise: float = 0.0
    rotation: bool = False
    texture: bool = False
    prefs_per_image: int = 2

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ConfigError(f"--n (number of images) must be >= 1; got {self.n}")
        check_split(self.split)
        for flag, value in (("--image-size", self.image_size), ("--height", self.height)):
            if value is not None and not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
                raise ConfigError(f"{flag} must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} px; got {value}")
        if self.clips < 0:
            raise ConfigError(f"--clips must be >= 0; got {self.clips}")
        if self.clip_frames < 2:
            raise ConfigError(f"--clip-frames must be >= 2 (a clip needs motion); got {self.clip_frames}")
        if not 0.0 <= self.noise <= 1.0:
            raise ConfigError(f"--noise must be in [0, 1] (std of pixel noise as a fraction of 255); got {self.noise}")
        if not 0 <= self.prefs_per_image <= 4:
            raise ConfigError(f"prefs_per_image must be in 0..4; got {self.prefs_per_image}")

    @property
    def width(self) -> int:
        return self.image_size

    @property
    def image_height(self) -> int:
        return self.image_size if self.height is None else self.height


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def _scene_records(cfg: WorldConfig, i: int, images: Path) -> dict[str, Any]:
    """Render scene ``i`` into ``images/`` and return its records for every output file."""
    rng = scene_rng(cfg.seed, cfg.split, i)
    scene = sample_scene(rng, cfg.split)
    w, h = cfg.width, cfg.image_height
    img = render_scene(scene, w, h, cfg.noise, cfg.rotation, cfg.texture, seed=rng.getrandbits(32))
    sid, rel = f"{i:06d}", f"images/{i:06d}.png"
    img.save(images / f"{sid}.png", format="PNG", compress_level=1)
    captions = captions_for(scene)
    caption = rng.choice(captions_for(scene, complete_only=True))
    questions = questions_for(scene, rng)
    prefs = preference_pairs_for(scene, rng)
    prefs = rng.sample(prefs, min(cfg.prefs_per_image, len(prefs)))
    turns = []
    for k, q in enumerate(questions):
        turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + q.question})
        turns.append({"from": "gpt", "value": q.answer})
    return {
        "pair": {"image": rel, "caption": caption, "id": sid},
        "conversation": {"id": sid, "image": rel, "conversations": turns, "kinds": [q.kind for q in questions]},
        "preferences": [{"image": rel, "id": sid, **p.to_dict()} for p in prefs],
        "scene": {
            "id": sid,
            "image": rel,
            "width": w,
            "height": h,
            **scene.to_dict(w, h),
            "relations": [[a, r, b] for a, r, b in scene.relations()],
            "caption": caption,
            "captions": captions,
            "questions": [q.to_dict() for q in questions],
        },
    }


def _clip_record(cfg: WorldConfig, j: int, clips_dir: Path) -> dict[str, Any]:
    rng = random.Random(derive_seed("clip", int(cfg.seed), cfg.split, j))
    clip = sample_clip(rng, cfg.clip_frames, cfg.split)
    frames = render_clip(clip, cfg.width, cfg.image_height, cfg.noise, cfg.texture, seed=rng.getrandbits(32))
    cid = f"{j:06d}"
    (clips_dir / cid).mkdir(parents=True)
    paths = []
    for t, frame in enumerate(frames):
        frame.save(clips_dir / cid / f"frame_{t:02d}.png", format="PNG", compress_level=1)
        paths.append(f"clips/{cid}/frame_{t:02d}.png")
    captions = clip_captions(clip)
    return {
        "id": cid,
        "frames": paths,
        "n_frames": clip.n_frames,
        "width": cfg.width,
        "height": cfg.image_height,
        "caption": rng.choice(captions),
        "captions": captions,
        "objects": [o.to_dict(clip.n_frames) for o in clip.objects],
        "motions": [o.motion for o in clip.objects],
        "questions": [q.to_dict() for q in clip_questions(clip, rng)],
    }


def _check_target(out: Path) -> None:
    """Refuse to replace a folder that is not a shapes world (``atomic_dir`` swaps the whole folder)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "world.json").is_file())):
        raise ConfigError(
            f"--out {out} exists and is not a shapes-world folder (no world.json); choose a new folder or remove it"
        )


def generate_world(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    split: str = "train",
    image_size: int = 64,
    clips: int = 0,
    **options: Any,
) -> dict[str, Any]:
    """Generate a dataset folder (see the module docstring) and return a summary dict.

    ``options`` are the other ``WorldConfig`` fields: height, clip_frames, noise, rotation, texture,
    prefs_per_image. Raises ``ConfigError`` for bad values (naming the CLI flag).
    """
    unknown = set(options) - set(WorldConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(
            f"unknown generate_world option(s) {sorted(unknown)}; known: {sorted(WorldConfig.__dataclass_fields__)}"
        )
    cfg = WorldConfig(n=n, seed=seed, split=split, image_size=image_size, clips=clips, **options)
    out = Path(out_dir)
    _check_target(out)
    with atomic_dir(out) as tmp, make_progress() as progress:
        task = progress.add_task(f"world {cfg.split}", total=cfg.n + cfg.clips)
        counts = _write_scenes(cfg, tmp, lambda: progress.advance(task))
        if cfg.clips:
            records = []
            for j in range(cfg.clips):
                records.append(_clip_record(cfg, j, tmp / "clips"))
                progress.advance(task)
            (tmp / "clips.jsonl").write_text("".join(_dumps(r) + "\n" for r in records), encoding="utf-8")
        summary = _summary(cfg, counts)
        (tmp / "world.json").write_text(json.dumps(summary, sort_keys=True, ensure_ascii=False, indent=2) + "\n")
    return {"out": str(out), **summary}


def _write_scenes(cfg: WorldConfig, tmp: Path, advance: Callable[[], None]) -> Counter[str]:
    """Write images, pairs, preferences, scenes and conversations into ``tmp``; return counts."""
    counts: Counter[str] = Counter()
    conversations = []
    (tmp / "images").mkdir()
    with ExitStack() as stack:
        files = {n: stack.enter_context(open(tmp / n, "w", encoding="utf-8")) for n in _JSONL_FILES}
        for i in range(cfg.n):
            rec = _scene_records(cfg, i, tmp / "images")
            files["pairs.jsonl"].write(_dumps(rec["pair"]) + "\n")
            files["scenes.jsonl"].write(_dumps(rec["scene"]) + "\n")
            for p in rec["preferences"]:
                files["preferences.jsonl"].write(_dumps(p) + "\n")
                counts["rejection:" + p["rejection"]] += 1
            conversations.append(rec["conversation"])
            counts.update("kind:" + k for k in rec["conversation"]["kinds"])
            counts["objects"] += len(rec["scene"]["objects"])
            advance()
    text = json.dumps(conversations, sort_keys=True, ensure_ascii=False, indent=1) + "\n"
    (tmp / "conversations.json").write_text(text, encoding="utf-8")
    return counts


_JSONL_FILES = ("pairs.jsonl", "preferences.jsonl", "scenes.jsonl")


def _summary(cfg: WorldConfig, counts: Counter[str]) -> dict[str, Any]:
    kinds = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("kind:")}
    rejections = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("rejection:")}
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "split": cfg.split,
        "image_size": [cfg.width, cfg.image_height],
        "options": {
            k: v for k, v in asdict(cfg).items() if k not in ("n", "seed", "split", "image_size", "height", "clips")
        },
        "vocabulary": WORLD.to_dict(),
        "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS],
        "n_scenes": cfg.n,
        "n_objects": counts["objects"],
        "n_questions": sum(kinds.values()),
        "question_kinds": kinds,
        "n_preferences": sum(rejections.values()),
        "rejections": rejections,
        "n_clips": cfg.clips,
    }

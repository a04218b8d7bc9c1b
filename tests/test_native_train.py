"""The native recipes end to end at micro size: learning to caption colours, resume, the CLI commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmstack.config import configs_dir, load_config
from mmstack.world import COLOURS
from mmstack.world.render import render_scene
from mmstack.world.scene import Scene, WorldObject

pytestmark = pytest.mark.slow


def colour_folder(path, n_per_colour: int, seed: int) -> list[str]:
    """A pairs folder of 16 px images: one large circle of a random colour near the centre, 'a <colour> circle'."""
    rng = np.random.default_rng(seed)
    (path / "images").mkdir(parents=True)
    colours, lines = [], []
    for i in range(n_per_colour * len(COLOURS)):
        colour = list(COLOURS)[i % len(COLOURS)]
        obj = WorldObject("circle", colour, "large", "center", float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)))
        render_scene(Scene((obj,)), 16).save(path / "images" / f"{i:04d}.png")
        lines.append(json.dumps({"image": f"images/{i:04d}.png", "caption": f"a {colour} circle", "id": f"{i:04d}"}))
        colours.append(colour)
    (path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return colours


def micro_recipes(tmp_path, native_steps: int, **native_overrides):
    from mmstack.train.native import NativeRecipeConfig
    from mmstack.train.vq import VQRecipeConfig

    cache = {"data": {"cache_dir": str(tmp_path / "cache")}}
    vq = load_config(VQRecipeConfig, configs_dir() / "vq-micro.yaml", cache)
    native = load_config(
        NativeRecipeConfig,
        configs_dir() / "native-micro.yaml",
        {
            **cache,
            "train": {"max_steps": native_steps, "batch_size": 32, "lr": 3e-3, "warmup_steps": 10},
            **native_overrides,
        },
    )
    return vq, native


def test_micro_run_learns_to_caption_colours_above_chance(tmp_path):
    from mmstack.models.native import NativeModel
    from mmstack.train.native import train_native
    from mmstack.train.vq import train_vq

    torch.set_num_threads(1)
    colour_folder(tmp_path / "train", 12, seed=0)
    truth = colour_folder(tmp_path / "test", 3, seed=1)  # new jitter: unseen images
    vq_cfg, nat_cfg = micro_recipes(tmp_path, 80, data={"cache_dir": str(tmp_path / "cache"), "mix": {"i2t": 1.0}})
    train_vq(vq_cfg, tmp_path / "train", tmp_path / "vq")
    train_native(nat_cfg, tmp_path / "train", tmp_path / "vq", tmp_path / "native")
    model = NativeModel.from_pretrained(tmp_path / "native")
    images = [str(p) for p in sorted((tmp_path / "test" / "images").glob("*.png"))]
    captions = model.generate(images, "text").outputs
    said = [next((w for w in c.split() if w in COLOURS), None) for c in captions]
    accuracy = float(np.mean([s == t for s, t in zip(said, truth, strict=True)]))
    assert accuracy >= 0.5, (accuracy, captions[:8])  # chance is 1/8


def test_native_resume_equals_uninterrupted_run(tmp_path):
    from mmstack.train.native import train_native
    from mmstack.train.vq import train_vq

    torch.set_num_threads(1)
    colour_folder(tmp_path / "train", 4, seed=0)
    vq_cfg, nat_cfg = micro_recipes(tmp_path, 6, data={"cache_dir": str(tmp_path / "cache"), "p_uncond": 0.5})
    train_vq(vq_cfg, tmp_path / "train", tmp_path / "vq")
    train_native(nat_cfg, tmp_path / "train", tmp_path / "vq", tmp_path / "full")
    partial = train_native(nat_cfg, tmp_path / "train", tmp_path / "vq", tmp_path / "resumed", stop_after=3)
    assert partial.summary.steps == 3
    resumed = train_native(nat_cfg, tmp_path / "train", tmp_path / "vq", tmp_path / "resumed")
    assert resumed.summary.start_step == 3 and resumed.summary.steps == 6
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_train_eval_generate_caption(tmp_path, run_cli):
    from mmstack.world import generate_world

    generate_world(tmp_path / "train", n=64, seed=0, image_size=16, clips=4, clip_frames=2)
    generate_world(tmp_path / "val", n=8, seed=1, split="val", image_size=16, clips=2, clip_frames=2)
    cache = ["--data.cache_dir", str(tmp_path / "cache")]
    res = run_cli(
        "train", "vq", "--config", "vq-micro", "--data", tmp_path / "train", "--out", tmp_path / "vq", *cache, "--json"
    )
    assert res.code == 0, res.err
    res = run_cli(
        "train", "native", "--tokenizer", tmp_path / "vq", "--config", "native-micro", "--data", tmp_path / "train",
        "--out", tmp_path / "native", "--data.mix", "{t2i: 1, i2t: 1, v2t: 0.5}", *cache, "--json",
    )  # fmt: skip
    assert res.code == 0, res.err
    assert res.json()["steps"] == 8 and res.json()["loss_image"] > 0
    res = run_cli(
        "eval", "native", "--model", tmp_path / "native", "--data", tmp_path / "val", "--n_generate", "4", "--json"
    )
    assert res.code == 0, res.err
    ev = res.json()
    gen = ev["generation"]
    assert set(gen["sweep"]) == {"1.0", "3.0"} and 0 <= gen["object_accuracy"] <= 1
    assert gen["bounds"]["real"] >= 0.5  # the parser reads real 16 px images (a sanity floor for the scorer)
    assert 0 <= ev["validity"]["valid_rate"] <= 1 and "caption_accuracy" in ev["captioning"]
    assert "motion_accuracy" in ev["clips"] and ev["reconstruction"]["codes_used"] > 0
    res = run_cli(
        "generate",
        "a large red circle at the top left",
        "--model",
        tmp_path / "native",
        "--out",
        tmp_path / "g.png",
        "--json",
    )
    assert res.code == 0, res.err and (tmp_path / "g.png").is_file()
    res = run_cli(
        "generate",
        "a red circle",
        "--model",
        tmp_path / "native",
        "--video",
        "2",
        "--out",
        tmp_path / "v.png",
        "--json",
    )
    assert res.code == 0 and len(res.json()["out"]) == 2
    res = run_cli("caption", tmp_path / "g.png", "--model", tmp_path / "native", "--json")
    assert res.code == 0, res.err
    assert isinstance(res.json()["caption"], str)
    res = run_cli("caption", tmp_path / "missing.png", "--model", tmp_path / "native")
    assert res.code == 2 and "not found" in res.err and "Traceback" not in res.err


def test_demo_stage_trains_evaluates_and_draws(tmp_path):
    from mmstack.demo import native_stage
    from mmstack.demo.pipeline import DemoContext
    from mmstack.world import generate_world

    ctx = DemoContext(out=tmp_path, config={}, smoke=True)
    for offset, split in enumerate(("train", "val")):
        generate_world(tmp_path / "world" / split, n=64 if split == "train" else 6, seed=1000 * offset, split=split)
    result = native_stage.run(ctx, {"native_overrides": {"train": {"max_steps": 4}}})
    assert {"psnr", "object_accuracy", "object_accuracy_no_cfg", "caption_accuracy", "valid_rate"} <= set(
        result.metrics
    )
    assert all((tmp_path / p).is_file() for p in result.outputs)
    assert "native.png" in result.html and "not FID" in result.html
    again = native_stage.run(ctx, {"native_overrides": {"train": {"max_steps": 4}}})  # reuses both checkpoints
    assert again.metrics["native_steps"] == 4 and again.metrics["psnr"] == result.metrics["psnr"]

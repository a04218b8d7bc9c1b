"""``mmstack train clip`` end to end on a tiny synthetic world: learning, freezing, resume, overrides, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from mmstack.config import load_config
from mmstack.errors import ConfigError
from mmstack.models.two_tower import TwoTowerModel
from mmstack.train.clip import ClipRecipeConfig, build_model, read_training_pairs, train_clip
from mmstack.utils.seeding import seed_everything

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 50), "blue": (30, 70, 230), "yellow": (235, 230, 40)}
SHAPES = ("circle", "square")
MICRO = Path(__file__).parents[1] / "configs" / "clip-micro.yaml"


def make_world(root: Path, n: int, seed: int) -> Path:
    """One shape per 32 px image, 2 shapes x 4 colours; captions name colour and shape (8 classes)."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        img = Image.new("RGB", (32, 32), (255, 255, 255))
        r, cx, cy = rng.randint(6, 9), rng.randint(10, 22), rng.randint(10, 22)
        box = (cx - r, cy - r, cx + r, cy + r)
        draw = ImageDraw.Draw(img)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        img.save(root / "images" / f"{i:04d}.png")
        caption = rng.choice([f"a {colour} {shape}", f"there is a {colour} {shape}", f"one {colour} {shape}"])
        lines.append(json.dumps({"image": f"images/{i:04d}.png", "caption": caption, "id": f"{i:04d}"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clipworld")
    return {
        "train": make_world(root / "train", 320, seed=1),
        "val": make_world(root / "val", 96, seed=2),
        "cache": root / "cache",
    }


def micro_cfg(world, **train) -> ClipRecipeConfig:
    overrides = {"data": {"cache_dir": str(world["cache"])}, "train": {"threads": 1, **train}}
    return load_config(ClipRecipeConfig, MICRO, overrides=overrides)


@torch.no_grad()
def class_r1(model: TwoTowerModel, data: Path) -> float:
    """Text->image R@1 where a hit is any image of the caption's (colour, shape) class."""
    from mmstack.data.pairs import read_pairs

    pairs = read_pairs(data)
    label = [" ".join(p.caption.split()[-2:]) for p in pairs]
    imgs = model.processor.images([Image.open(p.image).convert("RGB") for p in pairs])
    img = model.encode_image(imgs, normalize=True)
    txt = model.encode_text(**model.processor.text([p.caption for p in pairs]), normalize=True)
    top = (txt @ img.T).argmax(1)
    return sum(label[int(j)] == label[i] for i, j in enumerate(top)) / len(pairs)


@pytest.mark.slow
def test_micro_run_beats_chance_and_prints_one_json(world, tmp_path, run_cli):
    out = tmp_path / "ckpt"
    res = run_cli(
        "train", "clip", "--config", MICRO, "--data", world["train"], "--out", out, "--json",
        "--max-steps", "60", f"data.cache_dir={world['cache']}", "--train.threads", "1",
    )  # fmt: skip
    assert res.code == 0, res.err
    result = res.json()
    assert result["steps"] == 60 and result["samples_per_s"] > 0 and 0 < result["temperature"] < 1
    model = TwoTowerModel.from_pretrained(out)
    r1 = class_r1(model, world["val"])
    assert r1 >= 0.6, f"text->image R@1 {r1:.2f}; chance is about 1/8"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] and "temperature" in rows[-1]
    card = json.loads((out / "config.json").read_text())
    assert card["card"]["training"]["summary"]["steps"] == 60 and (out / "train_config.json").is_file()


def test_resumed_recipe_equals_uninterrupted(world, tmp_path):
    cfg = micro_cfg(world, max_steps=6, batch_size=32, save_every=2)
    train_clip(cfg, world["train"], tmp_path / "full")
    partial = train_clip(cfg, world["train"], tmp_path / "cut", stop_after=3)
    assert partial.summary.steps == 3 and not (tmp_path / "cut").exists()
    resumed = train_clip(cfg, world["train"], tmp_path / "cut")
    assert resumed.summary.start_step == 3
    a = TwoTowerModel.from_pretrained(tmp_path / "full").state_dict()
    b = TwoTowerModel.from_pretrained(tmp_path / "cut").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_text_tower_stays_bit_identical(world, tmp_path):
    cfg = micro_cfg(world, max_steps=4, batch_size=32, weight_decay=0.5)
    cfg.model.freeze_text = True
    train_clip(cfg, world["train"], tmp_path / "ckpt")
    seed_everything(cfg.train.seed)
    initial = build_model(cfg, read_training_pairs(world["train"], cfg.data.captions)[1]).state_dict()
    trained = TwoTowerModel.from_pretrained(tmp_path / "ckpt").state_dict()
    text = [k for k in initial if k.startswith(("text_model.", "text_projection."))]
    assert text and all(torch.equal(initial[k], trained[k]) for k in text)
    assert not torch.equal(initial["visual_projection.weight"], trained["visual_projection.weight"])


def test_dotted_overrides_reach_the_saved_config(world, tmp_path, run_cli):
    out = tmp_path / "ckpt"
    res = run_cli(
        "train", "clip", "--config", MICRO, "--data", world["train"], "--out", out, "--max-steps", "2",
        "--train.lr", "0.0005", "train.batch_size=32", f"data.cache_dir={world['cache']}", "--json",
    )  # fmt: skip
    assert res.code == 0, res.err
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["train"]["lr"] == 0.0005 and saved["train"]["batch_size"] == 32 and saved["train"]["max_steps"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["train.lr=-1"], "train.lr must be > 0"),
        (["train.lrr=0.1"], "did you mean 'lr'"),
        (["loss.type=cosine"], "loss.type must be one of"),
        (["model.preset=shapes-giant"], "unknown two-tower preset"),
        (["model.overrides.vision.patch_size=5"], "divisible by patch_size"),
        (["train.batch_size=4096"], "fewer than one batch"),
    ],
)
def test_bad_configs_give_one_line_errors(world, tmp_path, run_cli, extra, message):
    res = run_cli(
        "train", "clip", "--config", MICRO, "--data", world["train"], "--out", tmp_path / "x",
        f"data.cache_dir={world['cache']}", *extra,
    )  # fmt: skip
    assert res.code == 2, res.err
    assert message in res.err and len(res.err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_bad_data_gives_one_line_errors(tmp_path, run_cli):
    missing = run_cli("train", "clip", "--config", MICRO, "--data", tmp_path / "nope", "--out", tmp_path / "x")
    assert missing.code == 2 and "not found" in missing.err and len(missing.err.strip().splitlines()) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "pairs.jsonl").write_text('{"image": "images/0.png", "caption": "a red circle"}\n')
    broken = run_cli("train", "clip", "--config", MICRO, "--data", bad, "--out", tmp_path / "y")
    assert broken.code == 2 and "0.png" in broken.err and len(broken.err.strip().splitlines()) == 1
    no_cfg = run_cli("train", "clip", "--config", tmp_path / "none.yaml", "--data", bad, "--out", tmp_path / "z")
    assert no_cfg.code == 2 and "does not exist" in no_cfg.err


def test_shape_captions_join_each_scenes_caption_list(tmp_path):
    from mmstack.world import generate_world
    from mmstack.world.language import article, object_captions, shape_captions
    from mmstack.world.scene import Scene

    generate_world(tmp_path / "w", n=6, seed=5)
    scenes = [json.loads(line) for line in (tmp_path / "w" / "scenes.jsonl").read_text().splitlines()]
    plain = read_training_pairs(tmp_path / "w", "all")[1]
    extra = read_training_pairs(tmp_path / "w", "all", shape_copies=2, object_copies=1)[1]
    for rec, before, after in zip(scenes, plain, extra, strict=True):
        colourless, single = shape_captions(Scene.from_dict(rec)), object_captions(Scene.from_dict(rec))
        assert after == before + colourless * 2 + single
        named = [f"{o['colour']} {o['shape']}" for o in rec["objects"]]
        assert sorted(single) == sorted(f"an image with {article(w)} {w}" for w in named)
        for obj in rec["objects"]:  # every shape named, no colour or size word
            words = [c.replace(",", "").split() for c in colourless]
            assert all(obj["shape"] in w and obj["colour"] not in w and obj["size"] not in w for w in words)
    with pytest.raises(ConfigError, match=r"data\.shape_captions must be >= 0"):
        load_config(ClipRecipeConfig, MICRO, overrides={"data": {"shape_captions": -1}})
    with pytest.raises(ConfigError, match=r"data\.object_captions must be >= 0"):
        load_config(ClipRecipeConfig, MICRO, overrides={"data": {"object_captions": -2}})

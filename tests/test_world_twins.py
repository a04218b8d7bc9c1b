"""Hard-negative twins: one attribute of one object changes, split rules hold, batches pair scenes with twins."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from mmstack.config import load_config
from mmstack.errors import ConfigError, DataError
from mmstack.train.clip import ClipRecipeConfig, build_twins
from mmstack.train.clip_data import PairTensors
from mmstack.world import generate_world, sample_scenes
from mmstack.world.twins import twin_scene


def _diff(a, b) -> list[str]:
    """Attributes that differ between two scenes' objects (objects matched by sampling order)."""
    fields = ("shape", "colour", "size", "cell")
    return [f for x, y in zip(a.objects, b.objects, strict=True) for f in fields if getattr(x, f) != getattr(y, f)]


@pytest.mark.parametrize("split", ["train", "compositional"])
def test_twin_changes_exactly_one_attribute_and_keeps_split_rules(split):
    rng = random.Random(0)
    kinds = []
    for scene in sample_scenes(300, seed=1, split=split):
        twin = twin_scene(scene, rng, split)
        diff = _diff(scene, twin)
        assert len(diff) == 1, diff
        kinds.append(diff[0])
        assert len({o.cell for o in twin.objects}) == len(twin.objects)  # cells stay distinct
        if split == "train":
            assert not twin.has_held_out()
    # every attribute occurs and shape (the skipped cue) is the most common change
    counts = {k: kinds.count(k) for k in set(kinds)}
    assert set(counts) == {"shape", "colour", "size", "cell"}
    assert max(counts, key=counts.get) == "shape"


def test_batches_pair_items_with_their_twins():
    n = 8
    pixels = torch.arange(2 * n, dtype=torch.uint8).view(2 * n, 1, 1, 1).expand(2 * n, 3, 2, 2).contiguous()
    ids = torch.arange(2 * n).view(2 * n, 1)
    data = PairTensors(pixels, ids, torch.ones_like(ids), torch.arange(2 * n + 1), [0.0] * 3, [1.0] * 3, twins=0.5)
    assert len(data) == n  # the sampler draws scenes, not twins
    batch = data.batch(torch.tensor([3, 1, 6, 0]))
    assert batch["input_ids"].view(-1).tolist() == [3, 1, 3 + n, 1 + n]  # second half: twins of the first
    assert (batch["pixel_values"][:, 0, 0, 0] * 255).round().tolist() == [3.0, 1.0, 3.0 + n, 1.0 + n]


def test_twins_are_rendered_from_the_world(tmp_path):
    world = tmp_path / "w"
    generate_world(world, n=12, seed=0)
    cfg = load_config(ClipRecipeConfig, {"data": {"twins": 0.25, "captions": "pair"}})
    images, captions = build_twins(world, cfg)
    assert len(images) == len(captions) == 12 and all(len(c) == 1 for c in captions)
    assert images[0].size == (64, 64)
    again = build_twins(world, cfg)
    assert [c[0] for c in again[1]] == [c[0] for c in captions]  # deterministic


def test_twins_need_a_world_and_a_valid_share(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.twins"):
        load_config(ClipRecipeConfig, {"data": {"twins": 0.8}})
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "pairs.jsonl").write_text('{"image": "images/a.png", "caption": "x", "id": "a"}\n')
    cfg = load_config(ClipRecipeConfig, {"data": {"twins": 0.5}})
    with pytest.raises(DataError, match="shapes-world folder"):
        build_twins(tmp_path, cfg)

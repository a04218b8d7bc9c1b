"""Region-text alignment: box pooling weights, the loss by hand, world cell phrases, dense tower features,
the term in ClipTask (accumulation included) and in ``mmstack train clip``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tests.test_train_clip import MICRO
from tests.test_train_clip_task import grads_after_step, micro_model, random_batch

from mmstack.config import load_config
from mmstack.errors import ConfigError, DataError
from mmstack.models.losses import ClipLoss
from mmstack.models.regions import IGNORE, RegionTextLoss, box_weights, pool_regions
from mmstack.train.clip import ClipRecipeConfig, train_clip
from mmstack.train.clip_data import EMPTY_REGION, scene_regions
from mmstack.train.clip_task import ClipTask, RegionTerm


def test_box_weights_are_overlap_shares():
    half = box_weights(torch.tensor([[0.0, 0.0, 0.5, 1.0]]), 2, 2)  # the left half of a 2 x 2 grid
    torch.testing.assert_close(half, torch.tensor([[0.5, 0.0, 0.5, 0.0]]))
    # the top-centre world cell (a third of each side) on a 4 x 4 patch grid, overlaps by hand
    cell = box_weights(torch.tensor([1 / 3, 0.0, 2 / 3, 1 / 3], dtype=torch.float64), 4, 4).view(4, 4)
    x = torch.tensor([0.0, 1 / 6, 1 / 6, 0.0], dtype=torch.float64)  # patch columns [0, 1/4], [1/4, 1/2], ...
    y = torch.tensor([1 / 4, 1 / 12, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(cell, y[:, None] * x[None, :] / (y.sum() * x.sum()))
    assert cell.sum().item() == pytest.approx(1.0)
    outside = box_weights(torch.tensor([[1.5, 1.5, 2.0, 2.0]]), 2, 2)
    assert torch.equal(outside, torch.zeros(1, 4))


def test_pool_regions_averages_the_covered_patches():
    tokens = torch.arange(16.0).view(1, 4, 4)  # a 2 x 2 grid, 4-dim tokens
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 0.5]]])  # patch 0; patches 0 and 1
    pooled = pool_regions(tokens, boxes)
    torch.testing.assert_close(pooled[0, 0], tokens[0, 0])
    torch.testing.assert_close(pooled[0, 1], tokens[0, :2].mean(0))
    with pytest.raises(ValueError, match="square patch grid"):
        pool_regions(torch.zeros(1, 6, 4), boxes)


def test_region_loss_matches_a_hand_computed_cross_entropy():
    regions = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    phrases = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = RegionTextLoss(temperature=0.5)(regions, phrases, torch.tensor([0, 1, IGNORE]))
    # normalised: region 0 -> (1, 0), region 1 -> (0, 1); logits (2, 0) and (0, 2); the third is ignored
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    none = RegionTextLoss()(regions.requires_grad_(), phrases, torch.full((3,), IGNORE))
    none.backward()
    assert none.item() == 0.0 and torch.equal(regions.grad, torch.zeros_like(regions))
    with pytest.raises(ValueError, match="temperature"):
        RegionTextLoss(0.0)


def test_world_cells_get_their_objects_phrases(tmp_path):
    from mmstack.world import generate_world
    from mmstack.world.language import noun_phrase
    from mmstack.world.scene import Scene

    generate_world(tmp_path / "w", n=12, seed=3)
    scenes = [json.loads(line) for line in (tmp_path / "w" / "scenes.jsonl").read_text().splitlines()]
    boxes, pool, targets = scene_regions(tmp_path / "w", [s["id"] for s in scenes])
    assert boxes.shape == (12, 9, 4) and targets.shape == (12, 9) and pool[0] == EMPTY_REGION
    assert len(set(pool)) == len(pool)
    torch.testing.assert_close(boxes[0, 5], torch.tensor([2 / 3, 1 / 3, 1.0, 2 / 3]))  # middle right
    for k, rec in enumerate(scenes):
        objects = {o.row * 3 + o.col: noun_phrase(o) for o in Scene.from_dict(rec).objects}
        assert [pool[t] for t in targets[k].tolist()] == [objects.get(c, EMPTY_REGION) for c in range(9)]
    assert scene_regions(tmp_path / "w", ["no-such-id"]) is None
    assert scene_regions(tmp_path, ["x"]) is None  # no scenes.jsonl


@pytest.mark.parametrize("loss_type", ["clip", "siglip"])
def test_dense_tower_features_share_the_pooled_path(loss_type):
    model = micro_model(loss_type).eval()
    px = random_batch(3)["pixel_values"]
    pooled, patches = model.encode_image_tokens(px)
    torch.testing.assert_close(pooled, model.encode_image(px))
    assert patches.shape == (3, (32 // model.config.vision_hf().patch_size) ** 2, pooled.shape[-1])


def _region_task(model, weight: float = 1.0) -> ClipTask:
    tokens = model.processor.text(["a red circle", "a blue square", "an empty cell"])
    term = RegionTerm(RegionTextLoss(0.1), weight, tokens["input_ids"], tokens["attention_mask"])
    return ClipTask(model, ClipLoss(), regions=term)


def _region_batch(n: int) -> dict[str, torch.Tensor]:
    batch = random_batch(n, seed=4)
    g = torch.Generator().manual_seed(5)
    batch["region_boxes"] = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]).expand(n, 2, 4).clone()
    batch["region_targets"] = torch.randint(0, 3, (n, 2), generator=g)
    batch["region_targets"][0, 1] = IGNORE
    return batch


def test_region_term_adds_to_the_loss_and_survives_accumulation():
    model = micro_model()
    batch = _region_batch(16)
    task, plain = _region_task(model, weight=0.5), ClipTask(model, ClipLoss())
    feats = task.features(batch)
    without = {k: v for k, v in feats.items() if k != "region"}
    assert feats["region"].item() > 0
    assert task.full_loss(feats).item() == pytest.approx(plain.full_loss(without).item() + 0.5 * feats["region"].item())
    big, cached = grads_after_step(task, batch, 1), grads_after_step(task, batch, 2)
    for name in big:
        torch.testing.assert_close(cached[name], big[name], rtol=1e-4, atol=1e-6, msg=name)
    assert "region_loss" in task.train_step([batch])
    # the term really moves the patch tokens: gradients differ from the image-text loss alone
    alone = grads_after_step(plain, batch, 1)
    assert not torch.allclose(alone["visual_projection.weight"], big["visual_projection.weight"])
    with pytest.raises(ValueError, match="image-text loss"):
        ClipTask(model, None, torch.nn.Identity(), regions=task.regions)


def test_micro_recipe_learns_the_cell_phrases(tmp_path):
    from mmstack.world import generate_world

    generate_world(tmp_path / "train", n=256, seed=1, image_size=32)
    overrides = {
        "data": {"cache_dir": str(tmp_path / "cache"), "cell_regions": True},
        "loss": {"region_weight": 1.0},
        "train": {"threads": 1, "max_steps": 40, "log_every": 5},
    }
    cfg = load_config(ClipRecipeConfig, MICRO, overrides=overrides)
    train_clip(cfg, tmp_path / "train", tmp_path / "clip", resume=False)
    rows = [json.loads(line) for line in (tmp_path / "clip" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["region_loss"] < 0.8 * rows[0]["region_loss"]


def test_region_configs_and_data_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="go together"):
        load_config(ClipRecipeConfig, MICRO, overrides={"data": {"cell_regions": True}})
    with pytest.raises(ConfigError, match="go together"):
        load_config(ClipRecipeConfig, MICRO, overrides={"loss": {"region_weight": 1.0}})
    with pytest.raises(ConfigError, match="region_weight must be >= 0"):
        load_config(ClipRecipeConfig, MICRO, overrides={"loss": {"region_weight": -1.0}})
    (tmp_path / "d" / "images").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "d" / "images" / "0.png")
    (tmp_path / "d" / "pairs.jsonl").write_text('{"image": "images/0.png", "caption": "a red circle", "id": "0"}\n')
    cfg = load_config(
        ClipRecipeConfig, MICRO, overrides={"data": {"cell_regions": True}, "loss": {"region_weight": 1.0}}
    )
    with pytest.raises(DataError, match="cell_regions needs a shapes-world folder"):
        train_clip(cfg, tmp_path / "d", tmp_path / "out")

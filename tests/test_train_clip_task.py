"""ClipTask: accumulation with feature caching equals one big batch; the temperature clamp holds."""

from __future__ import annotations

import math

import pytest
import torch

from mmstack.models.losses import ClipLoss, NTXentLoss, SigLipLoss
from mmstack.models.two_tower import TwoTowerConfig, TwoTowerModel, default_processor
from mmstack.processing.tokenizer import train_caption_tokenizer
from mmstack.train.clip_task import ClipTask
from mmstack.train.task import Task

WORDS = ["red", "blue", "green", "circle", "square", "star", "left", "right", "small", "large"]


def micro_model(loss_type: str = "clip", seed: int = 0) -> TwoTowerModel:
    torch.manual_seed(seed)
    config = TwoTowerConfig.from_preset("shapes-micro", {"loss_type": loss_type})
    tokenizer = train_caption_tokenizer([" ".join(WORDS)], vocab_size=64, max_length=config.context_length)
    return TwoTowerModel.from_config(config, default_processor(config, tokenizer))


def random_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=g)
    ids = torch.randint(4, 14, (n, 10), generator=g)
    mask = (torch.arange(10)[None] < lengths[:, None]).long()
    ids = ids * mask
    ids[torch.arange(n), 0] = 2  # start token
    ids[torch.arange(n), lengths - 1] = 3  # end token: CLIP pools here
    px = torch.randn(n, 3, 32, 32, generator=g)
    return {
        "pixel_values": px,
        "input_ids": ids,
        "attention_mask": mask,
        "view1": px.flip(-1),
        "view2": px + 0.1 * torch.randn(px.shape, generator=g),
    }


def grads_after_step(task: ClipTask, batch: dict[str, torch.Tensor], chunks: int) -> dict[str, torch.Tensor]:
    task.model.zero_grad(set_to_none=True)
    idx = torch.arange(len(batch["pixel_values"]))
    micro = [{k: v[c] for k, v in batch.items()} for c in torch.tensor_split(idx, chunks)]
    task.train_step(micro)
    return {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", ["clip", "siglip"])
def test_feature_cached_accumulation_equals_big_batch(loss_type):
    model = micro_model(loss_type)
    loss = ClipLoss() if loss_type == "clip" else SigLipLoss()
    task = ClipTask(model, loss)
    batch = random_batch(24)
    big = grads_after_step(task, batch, 1)
    cached = grads_after_step(task, batch, 4)
    assert big.keys() == cached.keys() and "logit_scale" in big
    for name in big:
        torch.testing.assert_close(cached[name], big[name], rtol=1e-4, atol=1e-6, msg=name)
    # the naive alternative (loss per chunk) gives other gradients: the test can tell them apart
    naive = Task(model, lambda m, b: task.full_loss(task.features(b)))
    naive_grads = grads_after_step(naive, batch, 4)
    assert not torch.allclose(naive_grads["visual_projection.weight"], big["visual_projection.weight"], rtol=1e-3)


def test_simclr_term_is_cached_too():
    model = micro_model()
    task = ClipTask(model, ClipLoss(), NTXentLoss(temperature=0.2), simclr_weight=0.5)
    batch = random_batch(16, seed=1)
    big, cached = grads_after_step(task, batch, 1), grads_after_step(task, batch, 2)
    for name in big:
        torch.testing.assert_close(cached[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


def test_temperature_clamp_holds_after_steps():
    model = micro_model()
    task = ClipTask(model, ClipLoss())
    opt = torch.optim.SGD([model.logit_scale], lr=100.0)
    batch = random_batch(8)
    for sign in (-1.0, 1.0):  # push the scale far below 0 and far above ln 100
        for _ in range(3):
            opt.zero_grad()
            task.train_step([batch])
            model.logit_scale.grad = torch.full_like(model.logit_scale, sign * -1.0)
            opt.step()
            task.after_step()
            assert 0.0 <= model.logit_scale.item() <= math.log(100) + 1e-6
        assert model.logit_scale.item() == pytest.approx(0.0 if sign < 0 else math.log(100))
    metrics = task.train_step([batch])
    assert metrics["temperature"] == pytest.approx(0.01) and metrics["scale"] == pytest.approx(100.0)


def test_length_buckets_give_the_same_text_features_and_gradients():
    model = micro_model()
    batch = random_batch(24, seed=3)
    plain, bucketed = ClipTask(model, ClipLoss()), ClipTask(model, ClipLoss(), text_buckets=4)
    a = plain.encode_text(batch["input_ids"], batch["attention_mask"])
    b = bucketed.encode_text(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ga, gb = grads_after_step(plain, batch, 2), grads_after_step(bucketed, batch, 2)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=name)
    config = TwoTowerConfig.from_preset("shapes-siglip-tiny")
    tokenizer = train_caption_tokenizer(WORDS, vocab_size=64, max_length=config.context_length)
    siglip_towers = TwoTowerModel.from_config(config, default_processor(config, tokenizer))
    assert ClipTask(siglip_towers, SigLipLoss(), text_buckets=4).text_buckets == 1  # last-token pooling


def test_scale_lr_puts_the_temperature_in_its_own_group():
    model = micro_model("siglip")
    groups = ClipTask(model, SigLipLoss(), scale_lr=0.5).param_groups(0.1)
    own = [g for g in groups if g.get("lr") == 0.5]
    assert len(own) == 1 and {id(p) for p in own[0]["params"]} == {id(model.logit_scale), id(model.logit_bias)}
    assert own[0]["weight_decay"] == 0.0
    rest = [id(p) for g in groups if g is not own[0] for p in g["params"]]
    assert id(model.logit_scale) not in rest and len(rest) == len(list(model.parameters())) - 2
    assert ClipTask(model, SigLipLoss()).param_groups(0.1) == model.param_groups(0.1)

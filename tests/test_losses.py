"""Contrastive losses: parity with open_clip, NT-Xent against a plain loop, hard negatives, clamp, param groups."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmstack.models.losses import (
    ClipLoss,
    NTXentLoss,
    SigLipLoss,
    clamp_logit_scale_,
    hard_negative_logits,
    param_groups,
)
from mmstack.train.distributed import teardown


def _open_clip_loss():
    """open_clip/loss.py loaded by file path: the package import needs torchvision, which we don't install."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (make venv installs it with --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "loss.py"
    loss_spec = importlib.util.spec_from_file_location("open_clip_loss_reference", path)
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module


def _features(b: int = 12, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(b, d, generator=g), dim=-1)  # correlated, like a trained model
    return img.requires_grad_(), txt.requires_grad_()


def _loss_and_grads(fn, img, txt):
    loss = fn(img, txt)
    gi, gt = torch.autograd.grad(loss, (img, txt))
    return loss.detach(), gi, gt


@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_loss_matches_open_clip(with_bias):
    ref = _open_clip_loss().ClipLoss()
    ours = ClipLoss()
    img, txt = _features()
    scale = torch.tensor(1 / 0.07)
    bias = torch.tensor(-1.5) if with_bias else None
    a = _loss_and_grads(lambda i, t: ours(i, t, scale, bias), img, txt)
    b = _loss_and_grads(lambda i, t: ref(i, t, scale, logit_bias=bias), img, txt)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    assert 0.5 < float(a[0]) < 10  # a real, non-trivial value


def test_siglip_loss_matches_open_clip():
    ref = _open_clip_loss().SigLipLoss()
    ours = SigLipLoss()
    img, txt = _features(seed=1)
    for scale, bias in ((torch.tensor(10.0), torch.tensor(-10.0)), (torch.tensor(3.0), torch.tensor(0.5))):
        a = _loss_and_grads(lambda i, t, s=scale, c=bias: ours(i, t, s, c), img, txt)
        b = _loss_and_grads(lambda i, t, s=scale, c=bias: ref(i, t, s, c), img, txt)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_ntxent_matches_a_plain_loop():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    tau = 0.2
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = len(z)
    expected = 0.0
    for i in range(n):
        partner = (i + 5) % n
        sims = [math.exp(float(z[i] @ z[k]) / tau) for k in range(n) if k != i]
        expected += -math.log(math.exp(float(z[i] @ z[partner]) / tau) / sum(sims))
    expected /= n
    assert float(NTXentLoss(temperature=tau)(z1, z2)) == pytest.approx(expected, abs=1e-5)
    # a logit_scale argument overrides the temperature (the trainer passes the model's exp'd scale)
    assert float(NTXentLoss(temperature=0.9)(z1, z2, torch.tensor(1 / tau))) == pytest.approx(expected, abs=1e-5)
    # identical views are easier than unrelated ones
    assert float(NTXentLoss()(z1, z1)) < float(NTXentLoss()(z1, z2))


def test_hard_negative_mining_options():
    img, txt = _features(b=6, seed=3)
    img, txt = img.detach(), txt.detach()
    scale = 10.0
    plain = float(ClipLoss()(img, txt, scale))
    # beta = 0 and top-k over all negatives are the plain loss
    assert float(ClipLoss(hard_negative_beta=0.0)(img, txt, scale)) == pytest.approx(plain, abs=1e-6)
    assert float(ClipLoss(hard_negative_topk=5)(img, txt, scale)) == pytest.approx(plain, abs=1e-6)
    # up-weighting the most similar negatives (mean weight 1) can only raise the loss
    assert float(ClipLoss(hard_negative_beta=2.0)(img, txt, scale)) > plain + 1e-4
    # top-1: each row is a two-way choice between its positive and its hardest negative
    logits = scale * img @ txt.T
    labels = torch.arange(6)

    def two_way(lg):
        pos = lg.diagonal()
        hardest = lg.masked_fill(torch.eye(6, dtype=torch.bool), float("-inf")).max(dim=1).values
        return (torch.logaddexp(pos, hardest) - pos).mean()

    expected = float(two_way(logits) + two_way(logits.T)) / 2
    assert float(ClipLoss(hard_negative_topk=1)(img, txt, scale)) == pytest.approx(expected, abs=1e-5)
    # weights are detached: gradients still flow through the logits
    x = logits.clone().requires_grad_()
    hard_negative_logits(x, labels, beta=1.0).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_siglip_hard_negative_topk():
    img, txt = _features(b=5, seed=4)
    img, txt = img.detach(), txt.detach()
    scale, bias = 5.0, -2.0
    logits = scale * img @ txt.T + bias
    eye = torch.eye(5, dtype=torch.bool)
    hardest = logits.masked_fill(eye, float("-inf")).max(dim=1).values
    expected = (-F.logsigmoid(logits.diagonal()) - F.logsigmoid(-hardest)).sum() / 5
    got = SigLipLoss(hard_negative_topk=1)(img, txt, scale, bias)
    assert float(got) == pytest.approx(float(expected), abs=1e-5)
    assert float(SigLipLoss(hard_negative_topk=4)(img, txt, scale, bias)) == pytest.approx(
        float(SigLipLoss()(img, txt, scale, bias)), abs=1e-5
    )


def test_clamp_logit_scale():
    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale_(model)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(100))
    model.logit_scale.data.fill_(-0.5)
    clamp_logit_scale_(model)
    assert float(model.logit_scale.detach()) == 0.0
    model.logit_scale.data.fill_(2.0)
    clamp_logit_scale_(model)
    assert float(model.logit_scale.detach()) == 2.0


def test_param_groups_exclude_scale_bias_norms_and_frozen():
    from torch import nn

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.layer_norm = nn.LayerNorm(4)
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)
            self.logit_scale = nn.Parameter(torch.tensor(1.0))
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    toy = Toy()
    groups = param_groups(toy, 0.2)
    decay, plain = groups
    assert decay["weight_decay"] == 0.2 and plain["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(toy.proj.weight)]
    expected_plain = {id(toy.proj.bias), id(toy.layer_norm.weight), id(toy.layer_norm.bias)}
    expected_plain |= {id(toy.logit_scale), id(toy.logit_bias)}
    assert {id(p) for p in plain["params"]} == expected_plain


def _distributed_worker(rank: int, world_size: int, init_file: str, feats: dict, out_dir: str) -> None:
    """One gloo rank: losses over gathered features; saves its loss and its local features' gradients."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        b = feats["img"].shape[0] // world_size
        results = {}
        losses = {
            "clip": ClipLoss(gather_with_grad=True, rank=rank, world_size=world_size),
            "siglip": SigLipLoss(rank=rank, world_size=world_size),
            "ntxent": NTXentLoss(rank=rank, world_size=world_size),
        }
        for name, fn in losses.items():
            img = feats["img"][rank * b : (rank + 1) * b].clone().requires_grad_()
            txt = feats["txt"][rank * b : (rank + 1) * b].clone().requires_grad_()
            args = (img, txt, 10.0, -2.0) if name == "siglip" else (img, txt, 10.0) if name == "clip" else (img, txt)
            loss = fn(*args)
            loss.backward()
            results[name] = (loss.detach(), img.grad, txt.grad)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        teardown()  # ranks leave together: gloo can abort a rank that exits while its peer tears down


def test_losses_over_two_gloo_ranks_equal_the_big_batch(tmp_path):
    """Gathering with gradients: mean rank loss = big-batch loss; DDP-averaged gradients = big-batch ones."""
    import torch.multiprocessing as mp

    img, txt = _features(b=8, seed=5)
    feats = {"img": img.detach(), "txt": txt.detach()}
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), feats, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    big = {
        "clip": lambda i, t: ClipLoss()(i, t, 10.0),
        "siglip": lambda i, t: SigLipLoss()(i, t, 10.0, -2.0),
        "ntxent": lambda i, t: NTXentLoss()(i, t),
    }
    for name, fn in big.items():
        loss, gi, gt = _loss_and_grads(fn, img, txt)
        mean_loss = sum(r[name][0] for r in ranks) / 2
        torch.testing.assert_close(mean_loss, loss, atol=1e-5, rtol=1e-5, msg=name)
        # each rank's local gradient sums every rank's loss; DDP then divides by the world size
        torch.testing.assert_close(torch.cat([r[name][1] for r in ranks]) / 2, gi, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(torch.cat([r[name][2] for r in ranks]) / 2, gt, atol=1e-6, rtol=1e-5, msg=name)

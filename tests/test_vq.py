"""The VQ tokenizer: straight-through gradients, EMA codebook updates, k-means init, dead-code restart,
save/load, and the `mmstack train vq` recipe on a tiny world."""

from __future__ import annotations

import pytest
import torch

import mmstack
from mmstack.errors import ConfigError, ModelError
from mmstack.models.vq import EMAQuantizer, VQConfig, VQModel

MICRO = VQConfig(image_size=16, patch=4, codebook_size=8, channels=8, pixel_channels=4, kmeans_iters=3)


def quantizer(k: int = 4, d: int = 2, decay: float = 0.5, threshold: float = 0.0) -> EMAQuantizer:
    q = EMAQuantizer(k, d, decay=decay, dead_threshold=threshold)
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])[:k, :d])
    q.embed_sum.copy_(q.codebook)
    q.cluster_size.fill_(1.0)
    q.initted.fill_(True)
    return q


def test_straight_through_gradient_and_commitment():
    q = quantizer().eval()
    z = torch.tensor([[[[1.0]], [[2.0]]], [[[9.0]], [[2.0]]]], requires_grad=True)  # (B=2, D=2, 1, 1)
    z_q, idx, _ = q(z)
    assert idx.flatten().tolist() == [0, 1]  # nearest codes: (0,0) and (10,0)
    assert torch.equal(z_q.detach().flatten(), torch.tensor([0.0, 0.0, 10.0, 0.0]))
    w = torch.tensor([1.0, -2.0, 3.0, 0.5]).view(2, 2, 1, 1)
    (z_q * w).sum().backward()
    assert torch.equal(z.grad, w)  # the quantiser passes gradients through unchanged
    z.grad = None
    q(z)[2].backward()
    expected = 2 * (z.detach() - torch.tensor([0.0, 0.0, 10.0, 0.0]).view(2, 2, 1, 1)) / 4
    assert torch.allclose(z.grad, expected)  # d/dz mean ||z - sg(q)||^2
    assert not q.codebook.requires_grad


def test_ema_update_moves_codes_towards_assigned_vectors():
    q = quantizer(decay=0.5).train()
    z = torch.tensor([[1.0, 1.0], [3.0, 1.0], [9.0, 1.0]]).t().reshape(1, 2, 1, 3)  # three vectors
    _, idx, _ = q(z)
    assert idx.flatten().tolist() == [0, 0, 1]
    # counts: code0 0.5*1 + 0.5*2 = 1.5, sum 0.5*(0,0) + 0.5*(4,2) = (2,1); code1 count 1, sum (5+4.5, 0.5)
    size = q.cluster_size
    total, eps, k = float(size.sum()), q.eps, 4
    smoothed = (size + eps) / (total + k * eps) * total
    assert torch.allclose(size, torch.tensor([1.5, 1.0, 0.5, 0.5]))
    assert torch.allclose(q.codebook[0], torch.tensor([2.0, 1.0]) / smoothed[0])
    assert torch.allclose(q.codebook[1], torch.tensor([9.5, 0.5]) / smoothed[1])
    assert torch.allclose(q.codebook[2], torch.tensor([0.0, 5.0]) / smoothed[2])  # unused codes decay in place


def test_eval_mode_never_updates_the_codebook():
    q = quantizer().eval()
    before = q.codebook.clone()
    q(torch.randn(2, 2, 3, 3) * 5)
    assert torch.equal(q.codebook, before)


def test_dead_codes_restart_on_batch_vectors():
    q = quantizer(decay=0.5, threshold=0.6).train()
    z = torch.tensor([[0.1, 0.0], [0.2, 0.1], [7.0, 3.0]]).t().reshape(1, 2, 1, 3)
    q(z)
    # codes 2 and 3 were unused: their counts fell to 0.5 < 0.6, so they now sit on batch vectors
    vectors = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for k in (2, 3):
        assert any(torch.allclose(q.codebook[k], v) for v in vectors)
    assert q.restarts == 2


def test_kmeans_init_finds_weighted_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    points = torch.cat([c + 0.05 * torch.randn(50, 2) for c in centres] + [centres[:1].repeat(500, 1)])
    q = EMAQuantizer(4, 2, kmeans_iters=5)
    q.init_codebook(points)
    dist = torch.cdist(centres, q.codebook)  # (4 true centres, 4 codes)
    assert (dist.min(1).values < 0.1).all() and len(set(dist.argmin(1).tolist())) == 4
    assert bool(q.initted)


def test_model_starts_as_patch_kmeans_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = VQModel(MICRO)
    pixels = torch.rand(6, 3, 16, 16)
    model.init_codebook(pixels)
    codes = model.encode(pixels)
    assert codes.shape == (6, 4, 4) and codes.dtype == torch.long
    # identity patch embedding + zero-initialised branches: decoding is the codebook's patch, pixel for pixel
    patches = model.quantizer.codebook[codes].permute(0, 3, 1, 2)  # (B, 48, 4, 4)
    expected = torch.nn.functional.pixel_shuffle(patches, 4) * 0.5 + 0.5
    assert torch.allclose(model.decode(codes), expected.clamp(0, 1), atol=1e-6)
    model.save_pretrained(tmp_path / "vq", card={"metrics": {"psnr": 1.0}})
    loaded = mmstack.load(tmp_path / "vq")
    assert isinstance(loaded, VQModel)
    assert torch.equal(loaded.encode(pixels), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = VQModel(MICRO).train()
    x = torch.rand(4, 3, 16, 16)
    model.init_codebook(x)
    for _ in range(2):  # the zero-initialised last layers only pass gradients on after one step
        out = model(x)
        loss = (out.recon - x).pow(2).mean() + out.commit_loss
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(float(p.grad.abs().sum()) > 0 for p in model.parameters())


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ConfigError, match=r"multiple of vq\.patch"):
        VQConfig(image_size=30, patch=8)
    model = VQModel(MICRO)
    with pytest.raises(ModelError, match=r"\(B, 3, 16, 16\)"):
        model.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ModelError, match="codes must lie"):
        model.decode(torch.full((1, 4, 4), 99))


@pytest.mark.slow
def test_train_vq_recipe_and_cli(tmp_path, run_cli):
    from mmstack.world import generate_world

    generate_world(tmp_path / "train", n=48, seed=0, image_size=16, clips=2, clip_frames=2)
    generate_world(tmp_path / "val", n=16, seed=1, split="val", image_size=16)
    res = run_cli(
        "train", "vq", "--config", "vq-micro", "--data", tmp_path / "train", "--val", tmp_path / "val",
        "--out", tmp_path / "vq", "--data.cache_dir", tmp_path / "cache", "--json",
    )  # fmt: skip
    assert res.code == 0, res.err
    out = res.json()
    assert out["steps"] == 8 and out["val"]["images"] == 16
    assert 0 < out["val"]["codes_used"] <= 32 and out["val"]["psnr"] > 10
    model = mmstack.load(tmp_path / "vq")
    assert model.config.codebook_size == 32 and (tmp_path / "vq" / "metrics.jsonl").is_file()

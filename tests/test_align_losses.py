"""Alignment losses against hand-computed values: Bradley-Terry, DPO, sequence log-probs, KL-shaped
rewards, GAE and PPO's clipped policy and value losses."""

from __future__ import annotations

import math

import pytest
import torch

from mmstack.models.alignment_losses import (
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    gae,
    kl_shaped_rewards,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logps,
)


def test_bradley_terry_matches_hand_computation():
    # -log sigmoid(1 - 0) = 0.3132617, -log sigmoid(0 - 2) = 2.1269280; mean 1.2200948
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert loss.item() == pytest.approx(1.2200948, abs=1e-6)
    # a margin shifts the gap: -log sigmoid(1 - 0.5) = 0.4740770
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=0.5).item() == pytest.approx(
        0.4740770, abs=1e-6
    )


def test_bradley_terry_gradient_pushes_chosen_up():
    chosen, rejected = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected


def test_dpo_matches_hand_computation():
    # log-ratios: chosen -1 - (-2) = 1, rejected -3 - (-2) = -1; logits = 0.5 * (1 - (-1)) = 1
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    loss, r_chosen, r_rejected = dpo_loss(*args, beta=0.5)
    assert loss.item() == pytest.approx(0.3132617, abs=1e-6)  # -log sigmoid(1)
    assert r_chosen.item() == pytest.approx(0.5) and r_rejected.item() == pytest.approx(-0.5)
    smoothed, _, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * 0.3132617 + 0.1 * 1.3132617, abs=1e-6)


def test_dpo_is_log2_when_policy_equals_reference():
    logps = torch.tensor([-4.0, -7.5, -1.25])
    loss, r_c, r_r = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert torch.equal(r_c, torch.zeros(3)) and torch.equal(r_r, torch.zeros(3))


def test_sequence_logps_sums_labelled_tokens_only():
    logits = torch.zeros(1, 3, 2)
    logits[0, 0, 1] = math.log(3.0)  # position 0 predicts token 1 with p = 3/4
    logits[0, 2] = torch.tensor([50.0, -50.0])  # position 2 predicts nothing (no token after it)
    labels = torch.tensor([[-100, 1, 0]])  # position 1 predicts token 0 with p = 1/2
    logps, n = sequence_logps(logits, labels)
    assert logps.item() == pytest.approx(math.log(0.375), abs=1e-6) and n.item() == 2


def test_kl_shaped_rewards_add_score_at_last_response_token():
    logps = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -2.0]])
    mask = torch.tensor([[True, True, False]])
    rewards, kl = kl_shaped_rewards(torch.tensor([2.0]), logps, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 2.0, 0.0]]))


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.25, 9.0]])
    mask = torch.tensor([[True, True, False]])  # the third token is padding: its reward and value are ignored
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=1: delta = 1 - 0.25 = 0.75; t=0: delta = 0.9 * 0.25 - 0.5 = -0.275, A = -0.275 + 0.45 * 0.75 = 0.0625
    assert torch.allclose(adv, torch.tensor([[0.0625, 0.75, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.5625, 1.0, 0.0]]))


def test_gae_with_lambda_one_gives_monte_carlo_returns():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.4, 0.6]])
    adv, ret = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.ones(1, 3)) and torch.allclose(adv, 1 - values)


def test_ppo_policy_loss_clips_the_ratio():
    logps = torch.log(torch.tensor([[1.5, 0.5]]))
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = ppo_policy_loss(logps, old, adv, torch.ones(1, 2, dtype=torch.bool), clip_range=0.2)
    # token 0: max(-1.5, -1.2) = -1.2; token 1: max(0.5, 0.8) = 0.8; mean -0.2; both clipped
    assert loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert stats["clipfrac"] == 1.0
    assert stats["approx_kl"] == pytest.approx(0.25 * (math.log(1.5) ** 2 + math.log(0.5) ** 2), abs=1e-6)


def test_ppo_policy_loss_is_minus_mean_advantage_at_ratio_one():
    adv = torch.tensor([[0.3, -0.1, 2.0]])
    mask = torch.tensor([[True, True, False]])
    loss, stats = ppo_policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), adv, mask)
    assert loss.item() == pytest.approx(-0.1, abs=1e-7) and stats["clipfrac"] == 0.0


def test_ppo_value_loss_matches_hand_computation():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]])
    loss = ppo_value_loss(values, old, returns, torch.ones(1, 2, dtype=torch.bool), clip_range=0.2)
    # clipped values 0.7, 0.3: max(1, 1.69) and max(0, 0.09) -> 0.5 * mean(1.69, 0.09) = 0.445
    assert loss.item() == pytest.approx(0.445, abs=1e-6)


def test_masked_whiten_and_entropy():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    w = masked_whiten(x, torch.tensor([[True, True, False]]))
    assert torch.allclose(w, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4)
    uniform = entropy_from_logits(torch.zeros(1, 1, 4))
    assert uniform.item() == pytest.approx(math.log(4), abs=1e-6)

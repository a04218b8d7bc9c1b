"""Losses of preference alignment: Bradley-Terry, DPO, PPO's clipped objective and value loss, GAE.

Models return logits or scores; these functions turn them into losses (STYLE.md item 3). Everything works
on padded tensors with a mask, so one call covers a whole batch.

- ``sequence_logps``: summed log-probabilities of the labelled (answer) tokens of each row.
- ``bradley_terry_loss``: ``-log sigmoid(r_chosen - r_rejected)`` (the reward model, InstructGPT).
- ``dpo_loss``: Rafailov et al. 2023, eq. 7, with cDPO label smoothing (Mitchell 2023).
- ``kl_shaped_rewards`` + ``gae`` + ``ppo_policy_loss`` + ``ppo_value_loss``: the PPO recipe of
  Ziegler et al. 2019 / InstructGPT as TRL implements it (per-token KL penalty folded into the reward,
  the reward-model score added at the last token, generalised advantage estimation, clipped ratio).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------ helpers


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is true (over ``dim``, or over everything)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``x`` normalised to unit variance (and zero mean) over its masked entries; masked-out entries become 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each of ``tokens`` (B, L) under ``logits`` (B, L, V): (B, L)."""
    logps = torch.log_softmax(logits.float(), dim=-1)
    return logps.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution: (B, L, V) -> (B, L)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's labelled tokens and how many there are.

    Args:
        logits: (B, T, V) from a teacher-forced pass; position ``t`` predicts token ``t + 1``.
        labels: (B, T) token ids, ``IGNORE_INDEX`` where no loss applies (prompt, image, padding).

    Returns:
        ``(logps (B,), n_tokens (B,))``.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX  # (B, T-1)
    per_token = token_logps(logits[:, :-1], targets)  # (B, T-1)
    return (per_token * mask).sum(-1), mask.sum(-1)


# ---------------------------------------------------------------------------------- reward model


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Mean ``-log sigmoid(r_chosen - r_rejected - margin)`` over pairs (Bradley-Terry, as InstructGPT).

    ``margin`` (Llama 2's preference margin) asks for a larger gap where annotators were surer.
    """
    return -F.logsigmoid(chosen.float() - rejected.float() - margin).mean()


# --------------------------------------------------------------------------------------------- DPO


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss and the implicit rewards ``beta * (log pi - log pi_ref)`` of both answers.

    Args:
        policy_chosen, policy_rejected: (B,) summed answer log-probs under the policy.
        reference_chosen, reference_rejected: (B,) the same under the frozen reference.
        beta: strength of the implicit KL constraint (larger: stay closer to the reference).
        label_smoothing: cDPO's assumed probability that a pair's labels are flipped (0: plain DPO).

    Returns:
        ``(loss, chosen_rewards (B,), rejected_rewards (B,))``; the rewards are detached.
    """
    chosen_ratio = policy_chosen.float() - reference_chosen.float()
    rejected_ratio = policy_rejected.float() - reference_rejected.float()
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -F.logsigmoid(logits) * (1.0 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return losses.mean(), (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


# --------------------------------------------------------------------------------------------- PPO


def kl_shaped_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * (log pi - log pi_ref)`` at every response token, plus the
    reward model's score at the last one (the common recipe: the KL penalty lives in the reward).

    Args:
        scores: (B,) reward-model scores of the whole responses.
        logps, ref_logps: (B, L) log-probs of the sampled tokens under the rollout policy and the reference.
        mask: (B, L) true on response tokens (up to and including the end token).

    Returns:
        ``(rewards (B, L), kl (B, L))`` with zeros outside ``mask``.
    """
    mask_f = mask.to(logps.dtype)
    kl = (logps - ref_logps) * mask_f
    rewards = -kl_coef * kl
    last = (mask.long().cumsum(-1).argmax(-1)).clamp(min=0)  # index of the last response token
    rewards[torch.arange(rewards.shape[0]), last] += scores.to(rewards.dtype)
    return rewards * mask_f, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``; the value after
    the last response token is 0 (the episode ends).

    Args:
        rewards, values: (B, L); mask: (B, L) true on response tokens.

    Returns:
        ``(advantages (B, L), returns (B, L))`` with ``returns = advantages + values``; zeros outside ``mask``.
    """
    mask_f = mask.to(values.dtype)
    values = values * mask_f
    rewards = rewards * mask_f
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask_f[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask_f


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``, averaged over tokens.

    Returns the loss and ``clipfrac`` (share of tokens where clipping was active) and ``approx_kl``
    (``mean((log ratio)^2) / 2``, Schulman's low-variance estimator of KL(old || new)).
    """
    log_ratio = (logps - old_logps) * mask.to(logps.dtype)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = float(masked_mean((clipped > unclipped).float(), mask))
        approx_kl = float(masked_mean(0.5 * log_ratio**2, mask))
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> torch.Tensor:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_clipped - R)^2)`` averaged over response tokens."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    losses = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(losses, mask)

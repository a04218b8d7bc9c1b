"""Rollouts for PPO (and for scoring any policy): sample answers, then score them token by token.

``sample`` continues left-padded prompts with the policy's KV-cache generator; ``response_logps`` runs a
model teacher-forced over prompt + response and returns the log-probs (and entropies) of the response
tokens; ``score_responses`` asks the reward model. ``reward_and_kl`` puts them together to report a
policy's mean reward and its KL to the reference on held-out prompts (PPO and DPO alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmstack.models.alignment_losses import entropy_from_logits, token_logps
from mmstack.models.bridge_generate import GenerationConfig


@dataclass
class Samples:
    """Prompts and the sampled responses, as one right-extended sequence per row.

    ``input_ids``/``attention_mask`` (B, P + L) are the prompt (left-padded) followed by the response;
    ``response`` (B, L) and ``mask`` (B, L) mark the response tokens up to and including the end token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: Any
    response: torch.Tensor
    mask: torch.Tensor
    ended: torch.Tensor  # (B,) whether the response produced the end token

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response.shape[1]

    def model_inputs(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pixel_values": self.pixel_values}


def response_mask(
    response: torch.Tensor, eos_ids: list[int], placeholder_ids: list[int] = ()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which response tokens count, whether each row ended properly, and which tokens are placeholders.

    A row ends at its first end token or at its first ``<image>``/``<video>`` placeholder (which the
    model cannot read back as text: it is kept as a target, so PPO can learn not to emit it, but the
    row counts as unfinished). Returns ``mask`` (B, L) up to and including that token, ``ended`` (B,)
    and ``placeholder`` (B, L).
    """
    is_eos = torch.isin(response, torch.tensor(list(eos_ids), dtype=response.dtype))
    placeholder = torch.isin(response, torch.tensor(list(placeholder_ids), dtype=response.dtype))
    stop = (is_eos | placeholder).long()
    mask = (stop.cumsum(-1) - stop) == 0
    first_stop_is_eos = (is_eos & mask).any(-1)
    return mask, first_stop_is_eos, placeholder & mask


@torch.no_grad()
def sample(
    policy: nn.Module, batch: dict[str, Any], max_new_tokens: int, temperature: float = 1.0, seed: int | None = None
) -> Samples:
    """Sample one response per prompt of ``batch`` (left-padded ``PromptBatches`` output)."""
    proc = policy.processor
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        eos_token_ids=proc.stop_token_ids(),
        pad_token_id=proc.pad_token_id,
        seed=seed,
    )
    was_training = policy.training
    policy.eval()
    response = policy.generate(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), config=cfg)
    policy.train(was_training)
    placeholders = [t for t in (proc.image_token_id, proc.video_token_id) if t is not None]
    mask, ended, placeholder = response_mask(response, cfg.eos_token_ids, placeholders)
    # a placeholder is never fed back in (the model would expect pixels for it): pad in its place
    as_input = response.masked_fill(torch.isin(response, torch.tensor(placeholders or [-1])), proc.pad_token_id)
    return Samples(
        input_ids=torch.cat([batch["input_ids"], as_input], dim=1),
        attention_mask=torch.cat([batch["attention_mask"], (mask & ~placeholder).long()], dim=1),
        pixel_values=batch.get("pixel_values"),
        response=response,
        mask=mask,
        ended=ended,
    )


def response_logps(model: nn.Module, samples: Samples, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (B, L) of the response tokens under ``model`` and the entropy (B, L) of each step.

    Position ``P - 1 + t`` of the teacher-forced pass predicts response token ``t``.
    """
    logits = model(**samples.model_inputs()).logits  # (B, P + L, V)
    p = samples.prompt_len
    logits = logits[:, p - 1 : -1] / temperature  # (B, L, V)
    return token_logps(logits, samples.response), entropy_from_logits(logits)


def response_values(value_model: nn.Module, samples: Samples) -> torch.Tensor:
    """The value model's estimate (B, L) of the state before each response token."""
    values = value_model(**samples.model_inputs()).values  # (B, P + L)
    p = samples.prompt_len
    return values[:, p - 1 : -1]


@torch.no_grad()
def score_responses(reward_model: nn.Module, samples: Samples, missing_eos_penalty: float = 0.0) -> torch.Tensor:
    """Reward-model scores (B,) of the whole sequences; responses cut off before their end token lose
    ``missing_eos_penalty`` (the reward model only ever saw finished answers)."""
    answer = torch.zeros_like(samples.attention_mask, dtype=torch.bool)
    answer[:, samples.prompt_len :] = samples.attention_mask[:, samples.prompt_len :].bool()
    scores = reward_model(**samples.model_inputs(), answer_mask=answer).rewards.float()
    return scores - missing_eos_penalty * (~samples.ended).float()


@torch.no_grad()
def reward_and_kl(
    policy: nn.Module,
    reference: nn.Module,
    reward_model: nn.Module,
    prompts: Any,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, float]:
    """Mean reward of sampled answers (temperature 1) and the mean KL(policy || reference) per answer,
    estimated on those samples as the sum of ``log pi - log pi_ref`` over their tokens."""
    policy.eval()
    scores, kls, lengths = [], [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts.batch(torch.arange(start, min(start + batch_size, len(prompts))))
        s = sample(policy, batch, max_new_tokens, 1.0, seed=seed + start)
        logps, _ = response_logps(policy, s)
        ref_logps, _ = response_logps(reference, s)
        kls.append(((logps - ref_logps) * s.mask).sum(-1))
        scores.append(score_responses(reward_model, s))
        lengths.append(s.mask.sum(-1).float())
    score, kl, length = torch.cat(scores), torch.cat(kls), torch.cat(lengths)
    return {
        "reward": float(score.mean()),
        "kl": float(kl.mean()),
        "response_tokens": float(length.mean()),
        "n": len(score),
    }

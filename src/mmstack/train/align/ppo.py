"""The PPO recipe: RLHF of a bridge VLM against a multimodal reward model (InstructGPT / LLaVA-RLHF).

    cfg = load_config(PpoRecipeConfig, "configs/ppo-demo.yaml",
                      overrides=["model=runs/vlm/model", "reward=runs/reward/model"])
    train_ppo(cfg, out="runs/ppo")            # -> runs/ppo/model (a bridge checkpoint)

Four models: the policy (trained), a frozen reference copy of it, the frozen reward model, and a value
model initialised from the reward model (trained, as TRL does). A rollout samples one answer per prompt
at ``ppo.temperature`` (1.0), scores it with the reward model, folds a per-token KL penalty
``-kl_coef * (log pi - log pi_ref)`` into the rewards and computes advantages by GAE. The shared trainer
runs one optimiser step per call; the task samples a new rollout every ``ppo.epochs`` steps and reuses it
in between (its old log-probs fixed), which is PPO's inner epochs, so the clipped ratio matters. Metrics
(``metrics.jsonl``): score (reward), kl, entropy, clipfrac, approx_kl, value loss, response length.
A resumed run starts with a fresh rollout (rollouts are not checkpointed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmstack.config import to_dict
from mmstack.errors import ConfigError, ModelError
from mmstack.models.alignment_losses import (
    gae,
    kl_shaped_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from mmstack.models.reward import RewardModel
from mmstack.train.align.common import (
    AlignDataSection,
    LoraSection,
    TrainableSection,
    apply_trainable,
    fingerprint,
    frozen_reference,
    merge_lora,
    require_bridge,
    reuse_or_restart,
)
from mmstack.train.align.data import PromptBatches, load_preferences
from mmstack.train.align.dpo import EvalSection, evaluate_policy
from mmstack.train.align.rollout import Samples, response_logps, response_values, sample, score_responses
from mmstack.train.checkpoint import save_finished_run
from mmstack.train.task import Task
from mmstack.train.trainer import TrainConfig, Trainer
from mmstack.utils.seeding import seed_everything


@dataclass
class PpoSection:
    """PPO's knobs (defaults follow TRL's PPO trainer where they apply).

    Args:
        epochs: optimiser steps per rollout (PPO's inner epochs over the rollout).
        kl_coef: weight of the per-token KL penalty in the reward.
        clip_range: the policy ratio's clip ``1 +- clip_range``; value_clip: the value change's clip.
        vf_coef: weight of the value loss.
        gamma, lam: discount and GAE lambda.
        max_new_tokens, temperature: how answers are sampled.
        missing_eos_penalty: subtracted from the score of answers cut off before their end token.
        whiten_advantages: normalise advantages over the rollout's tokens.
    """

    epochs: int = 4
    kl_coef: float = 0.05
    clip_range: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    max_new_tokens: int = 32
    temperature: float = 1.0
    missing_eos_penalty: float = 1.0
    whiten_advantages: bool = True

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.max_new_tokens <= 0:
            raise ConfigError("ppo.epochs and ppo.max_new_tokens must be > 0")
        if self.kl_coef < 0 or self.clip_range <= 0 or self.value_clip <= 0 or self.vf_coef < 0:
            raise ConfigError("ppo.kl_coef and ppo.vf_coef must be >= 0, ppo.clip_range and ppo.value_clip > 0")
        if not (0.0 < self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0) or self.temperature <= 0:
            raise ConfigError("ppo.gamma must be in (0, 1], ppo.lam in [0, 1], ppo.temperature > 0")


def _default_train() -> TrainConfig:
    return TrainConfig(lr=1e-5, warmup_steps=0, max_steps=80, batch_size=16, weight_decay=0.0, log_every=4)


@dataclass
class PpoRecipeConfig:
    model: str = ""
    reward: str = ""
    trainable: TrainableSection = field(default_factory=TrainableSection)
    lora: LoraSection = field(default_factory=LoraSection)
    ppo: PpoSection = field(default_factory=PpoSection)
    data: AlignDataSection = field(default_factory=AlignDataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    train: TrainConfig = field(default_factory=_default_train)


@dataclass
class Rollout:
    """Samples with everything PPO's update needs (all (B, L) over the response tokens, but ``scores``)."""

    samples: Samples
    logps: torch.Tensor
    ref_logps: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    entropy: torch.Tensor

    def stats(self, kl_coef: float) -> dict[str, float]:
        """What the run logs about this rollout: reward, KL and entropy first."""
        mask = self.samples.mask
        kl_seq = self.kl.sum(-1)  # (B,)
        return {
            "score": float(self.scores.mean()),
            "kl": float(kl_seq.mean()),
            "entropy": float(masked_mean(self.entropy, mask)),
            "non_score_reward": float((-kl_coef * kl_seq).mean()),
            "response_tokens": float(mask.sum(-1).float().mean()),
            "eos_rate": float(self.samples.ended.float().mean()),
        }


class PpoTask(Task):
    """Rollouts and PPO updates of ``policy`` and ``value_model`` (the trained ``model`` is both).

    Args:
        policy: the bridge VLM being aligned.
        value_model: a ``RewardModel`` whose per-position scores are the values.
        reference: the frozen reference policy (the KL anchor).
        reward_model: the frozen reward model.
        cfg: PPO's settings. Sampling draws from torch's global generator, which the trainer seeds and
            restores on resume.
    """

    progress_keys = ("score", "kl", "entropy")

    def __init__(
        self,
        policy: nn.Module,
        value_model: nn.Module,
        reference: nn.Module,
        reward_model: nn.Module,
        cfg: PpoSection,
    ) -> None:
        super().__init__(nn.ModuleDict({"policy": policy, "value": value_model}))
        self.policy, self.value_model = policy, value_model
        self.reference, self.reward_model = reference, reward_model
        self.cfg = cfg
        self.updates = 0
        self.buffer: list[Rollout] = []

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any]) -> Rollout:
        """Sample answers to ``batch``'s prompts and prepare rewards, advantages and returns."""
        cfg = self.cfg
        samples = sample(self.policy, batch, cfg.max_new_tokens, cfg.temperature)
        mask = samples.mask
        was = self.model.training
        self.model.eval()
        logps, entropy = response_logps(self.policy, samples, cfg.temperature)
        ref_logps, _ = response_logps(self.reference, samples, cfg.temperature)
        values = response_values(self.value_model, samples) * mask
        self.model.train(was)
        scores = score_responses(self.reward_model, samples, cfg.missing_eos_penalty)
        rewards, kl = kl_shaped_rewards(scores, logps, ref_logps, mask, cfg.kl_coef)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return Rollout(samples, logps, ref_logps, values, scores, rewards, kl, advantages, returns, entropy)

    def update_loss(self, r: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """Clipped policy loss + weighted clipped value loss on one rollout."""
        mask = r.samples.mask
        logps, _ = response_logps(self.policy, r.samples, self.cfg.temperature)
        pg_loss, pg_stats = ppo_policy_loss(logps, r.logps, r.advantages, mask, self.cfg.clip_range)
        values = response_values(self.value_model, r.samples)
        vf_loss = ppo_value_loss(values, r.values, r.returns, mask, self.cfg.value_clip)
        loss = pg_loss + self.cfg.vf_coef * vf_loss
        return loss, {"pg_loss": float(pg_loss.detach()), "vf_loss": float(vf_loss.detach()), **pg_stats}

    def train_step(self, micro_batches: list[Any]) -> dict[str, float]:
        if not self.buffer or self.updates % self.cfg.epochs == 0:
            self.buffer = [self.forward_pass(self.rollout, b) for b in micro_batches]
        n = len(self.buffer)
        total, metrics = 0.0, {}
        for r in self.buffer:
            with self.autocast():
                loss, metrics = self.forward_pass(self.update_loss, r)
            (loss / n).backward()
            total += float(loss.detach()) / n
        self.updates += 1
        stats = self.buffer[-1].stats(self.cfg.kl_coef)
        return {"loss": total, **stats, **metrics}


def _check_compatible(policy: nn.Module, reward_model: RewardModel) -> None:
    """The reward model reads the policy's token ids: both must share the tokenizer and image preprocessing."""
    p, r = policy.processor, reward_model.processor
    if r is None or p.tokenizer.get_vocab() != r.tokenizer.get_vocab():
        raise ModelError("the reward model's tokenizer differs from the policy's; train it from the same VLM")
    if p.config.image != r.config.image or p.config.image_mode != r.config.image_mode:
        raise ModelError("the reward model preprocesses images differently from the policy; train it from the same VLM")


def train_ppo(cfg: PpoRecipeConfig, out: str | Path, resume: bool = True) -> dict[str, Any]:
    """Train (or reuse) a PPO policy into ``OUT/model``; returns the summary (with before/after eval)."""
    out = Path(out)
    train_path = cfg.data.require_train()
    if not cfg.reward:
        raise ConfigError("reward is not set: pass --reward PATH (a checkpoint from `mmstack train reward`)")
    run_config = {
        "recipe": to_dict(cfg),
        "model": fingerprint(cfg.model),
        "reward": fingerprint(cfg.reward),
        "data": fingerprint(train_path),
    }
    key, cached = reuse_or_restart(out, run_config, "ppo", resume)
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    seed_everything(cfg.train.seed)
    policy = require_bridge(cfg.model)
    reward_model = RewardModel.from_pretrained(cfg.reward)
    _check_compatible(policy, reward_model)
    reference = frozen_reference(policy)
    value_model = RewardModel.from_pretrained(cfg.reward).train()
    for p in reward_model.parameters():
        p.requires_grad_(False)
    before = evaluate_policy(reference, cfg.eval)
    prompts = PromptBatches(
        load_preferences(train_path, cfg.data.kinds, cfg.data.limit), policy.processor, cfg.data.cache_dir(out)
    )
    apply_trainable(policy, cfg.trainable, cfg.lora)
    task = PpoTask(policy.train(), value_model, reference, reward_model, cfg.ppo)
    trainer = Trainer(task, prompts, cfg.train, out, run_config=run_config, resume=resume)
    prepare_s = time.perf_counter() - t0
    fit = trainer.fit()
    merge_lora(policy)
    policy.eval()
    last = fit.last_metrics
    summary: dict[str, Any] = {
        "out": str(out),
        "model": str(out / "model"),
        "steps": fit.steps,
        "rollouts": -(-fit.steps // cfg.ppo.epochs),
        "prompts": len(prompts),
        "train_s": round(fit.seconds, 2),
        "prepare_s": round(prepare_s, 2),
        "final_loss": fit.final_loss,
        **{k: last[k] for k in ("score", "kl", "entropy", "clipfrac") if k in last},
    }
    after = evaluate_policy(policy, cfg.eval)
    if before is not None and after is not None:
        from mmstack.eval.alignment import compare

        summary["eval"] = {"before": before, "after": after, "change": compare(before, after)}
    save_finished_run(policy, out, run_config, key, summary, eval_key="eval")
    return summary

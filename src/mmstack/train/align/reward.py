"""The reward-model recipe: a bridge VLM + scalar head trained with the Bradley-Terry loss on preference pairs.

    cfg = load_config(RewardRecipeConfig, "configs/reward-demo.yaml", overrides=["model=runs/vlm/model"])
    train_reward(cfg, out="runs/reward")      # -> runs/reward/model (a RewardModel checkpoint)

The reward model starts from the trained VLM (it already sees the images) with a new head. Each step
scores B chosen and B rejected answers in one padded batch. ``OUT`` holds the run files of the shared
trainer (``metrics.jsonl``, ``train_config.json``, ``train_state/``), ``OUT/model`` the checkpoint and
``OUT/done.json``; a finished run with the same config, start checkpoint and data is reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmstack.config import to_dict
from mmstack.models.alignment_losses import bradley_terry_loss
from mmstack.models.reward import RewardModel
from mmstack.train.align.common import (
    AlignDataSection,
    LoraSection,
    TrainableSection,
    apply_trainable,
    fingerprint,
    merge_lora,
    require_bridge,
    reuse_or_restart,
)
from mmstack.train.align.data import PreferenceBatches, load_preferences, reward_inputs
from mmstack.train.checkpoint import save_finished_run
from mmstack.train.task import Task
from mmstack.train.trainer import TrainConfig, Trainer
from mmstack.utils.seeding import seed_everything


def _default_train() -> TrainConfig:
    return TrainConfig(lr=1e-4, warmup_steps=10, max_steps=200, batch_size=16, weight_decay=0.0, log_every=10)


@dataclass
class RewardRecipeConfig:
    """A reward-model run: ``model`` (the bridge checkpoint to start from), what trains, data, optimisation;
    ``likelihood`` adds the answer's log-likelihood under the model to the head's score (``RewardModel``)."""

    model: str = ""
    likelihood: bool = True
    trainable: TrainableSection = field(default_factory=TrainableSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: AlignDataSection = field(default_factory=AlignDataSection)
    train: TrainConfig = field(default_factory=_default_train)


class RewardTask(Task):
    """Bradley-Terry loss on the rewards of the chosen (first half) and rejected (second half) rows."""

    progress_keys = ("accuracy", "margin")

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = self.model(**reward_inputs(batch)).rewards
        chosen, rejected = rewards.chunk(2)
        loss = bradley_terry_loss(chosen, rejected)
        with torch.no_grad():
            metrics = {
                "accuracy": float((chosen > rejected).float().mean()),
                "margin": float((chosen - rejected).mean()),
                "reward_chosen": float(chosen.mean()),
                "reward_rejected": float(rejected.mean()),
            }
        return loss, metrics


def build_reward_model(cfg: RewardRecipeConfig) -> RewardModel:
    """The start checkpoint with its trainable parts set and a new scalar head."""
    vlm = require_bridge(cfg.model)
    apply_trainable(vlm, cfg.trainable, cfg.lora)
    return RewardModel(vlm, cfg.likelihood).train()


def train_reward(cfg: RewardRecipeConfig, out: str | Path, resume: bool = True) -> dict[str, Any]:
    """Train (or reuse) a reward model into ``OUT/model``; returns the run summary (with val accuracy)."""
    out = Path(out)
    train_path = cfg.data.require_train()
    run_config = {"recipe": to_dict(cfg), "model": fingerprint(cfg.model), "data": fingerprint(train_path)}
    key, cached = reuse_or_restart(out, run_config, "reward", resume)
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    seed_everything(cfg.train.seed)
    model = build_reward_model(cfg)
    prefs = load_preferences(train_path, cfg.data.kinds, cfg.data.limit)
    data = PreferenceBatches(prefs, model.processor, cfg.data.cache_dir(out))
    trainer = Trainer(RewardTask(model), data, cfg.train, out, run_config=run_config, resume=resume)
    prepare_s = time.perf_counter() - t0
    fit = trainer.fit()
    merge_lora(model.vlm)
    model.eval()
    summary: dict[str, Any] = {
        "out": str(out),
        "model": str(out / "model"),
        "steps": fit.steps,
        "pairs": len(data),
        "train_s": round(fit.seconds, 2),
        "prepare_s": round(prepare_s, 2),
        "final_loss": fit.final_loss,
        "train_accuracy": fit.last_metrics.get("accuracy"),
    }
    if cfg.data.val:
        from mmstack.eval.alignment import pairwise_accuracy

        summary["val"] = pairwise_accuracy(model, cfg.data.val, kinds=cfg.data.kinds, limit=cfg.data.val_limit)
    save_finished_run(model, out, run_config, key, summary, eval_key="val")
    return summary
